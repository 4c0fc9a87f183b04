"""The embedded offline world: multiple-choice questions about made-up animals, and a built-in teacher.

Every animal has a habitat and a size; what it eats follows from both by one rule (food_of). Questions ask where an
animal lives or what it eats, with the four habitats or the four foods as options (each wording rotates them, so no
answer keeps one letter). The teacher answers in the LLM teacher's exact format (METHOD 3.3), and its reasons state
the animal's habitat ("the X lives in the H ...") whatever the question.

Held-out knowledge: the test (and validation) questions ask where *held-out* animals live. Training never asks
that, so their habitat is never a gold answer; it appears only inside the rationales of their "what does it eat"
questions, where the gold answer is a food, and sizes are balanced within each habitat so that the food says
nothing about the habitat. Only a student that internalised the rationales (recall and analyze targets) can answer.
Options are fixed lists rather than entities, so no stage has to copy a name from "(B)" by position (the lesson
of the toy world that did not learn, TOY-WORLD-NOTES).

Status: the pipeline runs on it end to end; whether a from-scratch T5 learns it within the demo's CPU budget has
not been shown yet (issue 6 is open).
"""
import random
from dataclasses import dataclass, field

from data import LETTERS, Question

HABITATS = ["cave", "desert", "forest", "lake"]
FOODS = ["fish", "insects", "nuts", "seeds"]
SIZES = ["tiny", "small", "big", "huge"]


def food_of(habitat, size):
    """The general rule: a habitat offers four foods, and an animal's size picks one of them."""
    return FOODS[(HABITATS.index(habitat) + SIZES.index(size) + 1) % 4]


WHERE = ["Where does the {} live?", "What is the home of the {}?", "Where can you find the {}?"]
EAT = ["What does the {} eat?", "What is the food of the {}?", "What does the {} feed on?"]


def animal_names(count, rng):
    names = set()
    while len(names) < count:
        names.add(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") + rng.choice("bdgklmnprstvz") + rng.choice("aeiou"))
    return sorted(names)


@dataclass
class World:
    habitat: dict
    size: dict = field(default_factory=dict)
    animal: dict = field(default_factory=dict)  # question id -> (animal, kind)
    train: list = field(default_factory=list)
    valid: list = field(default_factory=list)
    test: list = field(default_factory=list)


def make_world(seed=0, per_habitat=24, known=12, valid=4):
    rng = random.Random(seed)
    names = animal_names(per_habitat * len(HABITATS), rng)
    rng.shuffle(names)
    habitat = {a: HABITATS[i % len(HABITATS)] for i, a in enumerate(names)}
    world = World(habitat)
    for h in HABITATS:   # sizes balanced within each habitat, so an animal's food says nothing about its habitat
        mine = [a for a in names if habitat[a] == h]
        for j, a in enumerate(mine):
            world.size[a] = SIZES[j % 4]
    groups = {"known": [], "valid": [], "test": []}
    for h in HABITATS:
        mine = [a for a in names if habitat[a] == h]
        groups["known"] += mine[:known]
        groups["valid"] += mine[known:known + valid]
        groups["test"] += mine[known + valid:]

    def ask(split, animal, kind, template, out):
        template, text = template
        base = HABITATS if kind == "where" else FOODS
        choices = base[template:] + base[:template]   # each wording has its own order, so no animal keeps one letter
        gold = habitat[animal] if kind == "where" else food_of(habitat[animal], world.size[animal])
        q = Question(f"{split}-{len(out)}", text.format(animal), list(choices), LETTERS[choices.index(gold)])
        world.animal[q.id] = (animal, kind)
        out.append(q)

    for a in names:
        for t in range(3):
            if a in groups["known"]:
                ask("train", a, "where", (t, WHERE[t]), world.train)
            ask("train", a, "eat", (t, EAT[t]), world.train)
    rng.shuffle(world.train)
    for a in groups["valid"]:
        for t in enumerate(WHERE):
            ask("valid", a, "where", t, world.valid)
    for a in groups["test"]:
        for t in enumerate(WHERE):
            ask("test", a, "where", t, world.test)
    return world


def teacher_completion(world, q):
    a, kind = world.animal[q.id]
    h = world.habitat[a]
    lines = [f"Key Information: the {a} has a home and a size."]
    order = [q.answer] + [x for x in LETTERS[:len(q.choices)] if x != q.answer]
    for i, x in enumerate(order):
        if kind == "where":
            reason = f"the {a} lives in the {h} (option {q.answer})" + ("." if x == q.answer else f", so not {x}.")
        else:
            f = food_of(h, world.size[a])
            reason = f"the {a} lives in the {h} and is {world.size[a]}, so it eats {f} (option {q.answer})" + ("." if x == q.answer else f", so not {x}.")
        verdict = "correct" if x == q.answer else "incorrect"
        lines.append(("Explanations: " if i == 0 else "") + f"{x} is {verdict}. Because {reason}")
    return "\n".join(lines)


# The student that learns this world: a small T5 from scratch and a sentencepiece vocabulary of about this size.
MODEL = dict(d_model=128, d_kv=32, d_ff=512, num_layers=2, num_heads=4, dropout_rate=0.0)
VOCAB_SIZE = 400


if __name__ == "__main__":
    w = make_world()
    print(len(w.train), len(w.valid), len(w.test))
    for q in w.train[:2] + w.test[:1]:
        print(q)
        print(teacher_completion(w, q))
        print()
