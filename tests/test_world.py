"""The embedded world: deterministic, answered by its teacher in the LLM teacher's format, and built so that the
held-out questions' knowledge is in training only inside rationales."""
import collections

import teacher
import world


def test_the_world_is_made_the_same_every_time():
    first, second = world.make_world(), world.make_world()
    assert (first.train, first.valid, first.test) == (second.train, second.valid, second.test)
    assert len(first.train) == 432 and len(first.valid) == 48 and len(first.test) == 96


def test_every_teacher_completion_goes_through_the_llm_parser():
    made, failures = world.make_world(), []
    records = [r for q in made.train for r in teacher.records_from_completions(
        q, [world.teacher_completion(made, q)], failures)]
    assert failures == [] and len(records) == len(made.train)
    for record in records:
        assert sorted(record["explanations"]) == ["A", "B", "C", "D"]


def test_held_out_habitats_appear_in_training_only_inside_rationales():
    made = world.make_world()
    asked_where = {made.animal[q.id][0] for q in made.train if made.animal[q.id][1] == "where"}
    golds = collections.defaultdict(set)  # animal -> gold answer texts it has in training
    for q in made.train:
        golds[made.animal[q.id][0]].add(q.choices["ABCD".index(q.answer)])
    rationales = " ".join(world.teacher_completion(made, q) for q in made.train)
    for q in made.valid + made.test:
        animal, kind = made.animal[q.id]
        habitat = q.choices["ABCD".index(q.answer)]
        assert kind == "where" and animal not in asked_where
        assert habitat not in golds[animal]  # never a gold answer for this animal ...
        assert f"the {animal} lives in the {habitat}" in rationales  # ... but stated in its rationales
