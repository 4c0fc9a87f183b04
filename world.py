"""The embedded offline world: a synthetic multiple-choice task with a built-in teacher (draft)."""
import random
from dataclasses import dataclass, field

from data import LETTERS, Question

HABITATS = {  # habitat -> landmarks that give it away (the general knowledge that recall states)
    "forest": ["oaks", "ferns", "pines"],
    "desert": ["dunes", "cacti", "scorpions"],
    "lake": ["reeds", "ducks", "lilies"],
    "cave": ["bats", "crystals", "echoes"],
    "meadow": ["daisies", "clover", "bees"],
    "swamp": ["frogs", "mangroves", "mud"],
}


def animal_names(count, rng):
    """Distinct pronounceable four-letter names (consonant-vowel-consonant-vowel)."""
    names = set()
    while len(names) < count:
        names.add(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") + rng.choice("bdgklmnprstvz") + rng.choice("aeiou"))
    return sorted(names)


@dataclass
class World:
    habitat: dict            # animal -> habitat
    held_out: set            # animals that are never a gold answer in training
    landmark: dict = field(default_factory=dict)   # question id -> landmark it names
    train: list = field(default_factory=list)
    valid: list = field(default_factory=list)
    test: list = field(default_factory=list)


def make_world(seed=0, per_habitat=8, held_out_per_habitat=4, n_train=600, n_valid=60, n_test=100, n_options=4):
    rng = random.Random(seed)
    habitats = list(HABITATS)
    names = animal_names(per_habitat * len(habitats), rng)
    rng.shuffle(names)
    habitat = {name: habitats[i % len(habitats)] for i, name in enumerate(names)}
    held_out = set()
    for h in habitats:
        held_out.update([a for a in names if habitat[a] == h][:held_out_per_habitat])
    world = World(habitat, held_out)
    seen = set()

    def make(split, count, gold_pool, distractor_pool):
        questions = []
        while len(questions) < count:
            gold = rng.choice(gold_pool)
            h = habitat[gold]
            landmark = rng.choice(HABITATS[h])
            others = rng.sample([a for a in distractor_pool if habitat[a] != h], n_options - 1)
            choices = [gold] + others
            rng.shuffle(choices)
            key = (landmark, tuple(choices))
            if key in seen:
                continue
            seen.add(key)
            q = Question(f"{split}-{len(questions)}", f"Which animal lives near the {landmark}?", choices,
                         LETTERS[choices.index(gold)])
            world.landmark[q.id] = landmark
            questions.append(q)
        return questions

    known = [a for a in names if a not in held_out]
    world.train = make("train", n_train, known, names)
    world.valid = make("valid", n_valid, sorted(held_out), sorted(held_out))
    world.test = make("test", n_test, sorted(held_out), sorted(held_out))
    return world


def teacher_completion(world, q):
    landmark = world.landmark[q.id]
    h = world.habitat[q.choices[LETTERS.index(q.answer)]]
    lines = [f"Key Information: {landmark} are found in the {h}."]
    order = [q.answer] + [x for x in LETTERS[:len(q.choices)] if x != q.answer]
    for i, x in enumerate(order):
        a = q.choices[LETTERS.index(x)]
        if x == q.answer:
            reason = f"the {a} lives in the {h}."
        else:
            reason = f"the {a} lives in the {world.habitat[a]}, not the {h}."
        verdict = "correct" if x == q.answer else "incorrect"
        lines.append(("Explanations: " if i == 0 else "") + f"{x} is {verdict}. Because {reason}")
    return "\n".join(lines)


if __name__ == "__main__":
    w = make_world()
    for q in w.train[:2] + w.test[:1]:
        print(q)
        print(teacher_completion(w, q))
        print()
