"""The embedded offline world: multiple-choice questions about made-up animals, and a built-in teacher.

Every animal has a habitat and a size. What it eats follows from both by one general rule (food_of). Questions ask
where an animal lives (options: the four habitats) or what it eats (options: the four foods); chance is 25%. The
teacher writes in the LLM teacher's exact format (METHOD 3.3). Its Key Information states the animal's facts, as
CSQA's states the knowledge a question needs: "the gonu lives in the cave and is big." Its explanations use them
and call the animal "it" (A22): "it lives in the cave (A)." or "it lives in the cave and is big, so it eats fish (C)."

Held-out knowledge, needed by the analyses and stated only in Key Information. The test and validation questions
ask what *held-out* animals eat. In training each of them is asked only where it lives (in each wording), so its
food is never a gold answer, and its size, which the rule needs, appears only in the Key Information of those
questions (a "where" explanation states the habitat alone). Sizes are balanced within each habitat, so the habitat
alone leaves the food at chance. A student answers only by recalling "the gonu lives in the cave and is big."
(the recall stage, trained on Key Information, must retrieve it) and then applying the rule in its analyses, which
condition on that recall. The analyze-summarize variant is never trained on Key Information, so it stays at chance on
purpose: this world asks whether the student can retrieve and use the knowledge, the paper's case for a recall stage.

Errors left for self-reflection. Every other ("known") animal is asked once where it lives and once what it eats,
each in a random wording, and there are many of them (10 per habitat and size), so the training "eat" questions are
better answered by applying the rule to what the student recalls, the skill the test needs, than by memorising
animal -> food. Until it has learned that, it gets training questions wrong (a quarter of them after half the demo's
acquire steps), mistakes for reflect to learn from; the converged demo student gets 0-3% wrong (BENCHMARKS.md).

Why a T5 trained from scratch learns it in minutes on a CPU:
* No letter -> option lookup by position: the animal is named once, in the question, and the options are a fixed
  small list: copying "the text after (B)" is a skill a tiny model does not learn in minutes.
* The fact is keyed by the token just before it: recall writes the animal's name, then its habitat and size; an
  analysis copies them from the recall, and the food follows from the two words it has just written.
* Summarize copies a letter: every analysis names the gold option as "(A)", so the gold letter appears five times in
  the summarize input. "(A)", not "option A": an analyze stage (4x the steps) that learned to predict the letter
  after "option" would fight the summarize target "... option A.".
* Each wording rotates the options, so summarize must read the analyses instead of memorising animal -> letter.
* One Key Information template for both kinds of question, so recalling an animal is a single skill that held-out
  animals also practise.
* Many known animals, each asked once per kind, so the analyses learn the rule rather than animal -> food.
Options in a fixed order per wording and analyses that name the gold letter make this far easier than real data,
on purpose: a world a tiny model cannot learn in minutes is the wrong world.

Tokenizer: the corpus repeats a few template words in a rigid order. On it a unigram sentencepiece stops far below
VOCAB_SIZE and splits even "the" into characters, about doubling sequence lengths; BPE (t5.Tokenizer.train) keeps
every word and name one piece.
"""
import random
import re
from dataclasses import dataclass, field

from data import LETTERS, Question, parse_cot, with_period

HABITATS = ["cave", "desert", "forest", "lake"]
FOODS = ["fish", "insects", "nuts", "seeds"]
SIZES = ["tiny", "small", "big", "huge"]
WHERE = ["Where does the {} live?", "What is the home of the {}?", "Where can you find the {}?"]
EAT = ["What does the {} eat?", "What is the food of the {}?", "What does the {} feed on?"]

# The student that learns this world: a small T5 from scratch (d_model 64, see BENCHMARKS.md for 128) and a (BPE)
# sentencepiece vocabulary of this size.
MODEL = dict(d_model=64, d_kv=16, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=4, dropout_rate=0.0)
VOCAB_SIZE = 400
# How both methods learn it from scratch (acquire, Tailored's round 1), sized with the presets of tinythinker.py and
# tailored.py so that a run fits in minutes on 2 CPU cores (BENCHMARKS.md, "The demo"): 30 epochs, as validation
# leaves chance in a jump about halfway; a validation every 150 steps, as one per 6-step cycle would cost more than
# the training.
FROM_SCRATCH = dict(model="scratch", batch_size=64, lr=3e-3, epochs=30, eval_every=150)


def food_of(habitat, size):
    """The general rule: a habitat offers four foods, and an animal's size picks one of them."""
    return FOODS[(HABITATS.index(habitat) + SIZES.index(size) + 1) % 4]


@dataclass
class World:
    habitat: dict                                 # animal -> habitat
    size: dict                                    # animal -> size
    animal: dict = field(default_factory=dict)    # question id -> (animal, "where" | "eat")
    train: list = field(default_factory=list)
    valid: list = field(default_factory=list)
    test: list = field(default_factory=list)


def animal_names(count, rng):
    """Distinct four-letter consonant-vowel names (one BPE piece each)."""
    names = set()
    while len(names) < count:
        consonant, vowel, end = rng.choice("bdfgklmnprstvz"), rng.choice("aeiou"), rng.choice("bdgklmnprstvz")
        names.add(consonant + vowel + end + rng.choice("aeiou"))
    return sorted(names)


def make_world(seed=0, per_habitat=52, known=40, valid=4):
    """Per habitat: `known` animals are asked once where they live and once what they eat in training; `valid`
    held-out animals are asked what they eat in validation, the rest in the test, in every wording; in training each
    held-out animal is asked only where it lives, in every wording, whose Key Information is the only place its size
    appears."""
    rng = random.Random(seed)
    names = animal_names(per_habitat * len(HABITATS), rng)
    rng.shuffle(names)
    world = World(habitat={}, size={})
    groups = {"known": [], "valid": [], "test": []}
    for h, habitat in enumerate(HABITATS):
        mine = names[h * per_habitat:(h + 1) * per_habitat]
        for j, a in enumerate(mine):
            world.habitat[a], world.size[a] = habitat, SIZES[j % len(SIZES)]   # balanced: food says nothing of habitat
        groups["known"] += mine[:known]
        groups["valid"] += mine[known:known + valid]
        groups["test"] += mine[known + valid:]

    def ask(split, a, kind, wording):
        options, texts = (HABITATS, WHERE) if kind == "where" else (FOODS, EAT)
        choices = options[wording:] + options[:wording]    # each wording rotates the options: no animal keeps a letter
        gold = world.habitat[a] if kind == "where" else food_of(world.habitat[a], world.size[a])
        questions = getattr(world, split)
        q = Question(f"world-{split}-{len(questions)}", texts[wording].format(a), choices, LETTERS[choices.index(gold)])
        world.animal[q.id] = (a, kind)
        questions.append(q)

    for a in groups["known"]:
        ask("train", a, "where", rng.randrange(len(WHERE)))
        ask("train", a, "eat", rng.randrange(len(EAT)))
    for a in groups["valid"] + groups["test"]:
        for wording in range(len(WHERE)):
            ask("train", a, "where", wording)
    rng.shuffle(world.train)
    for split in ("valid", "test"):
        for a in groups[split]:
            for wording in range(len(EAT)):
                ask(split, a, "eat", wording)
    return world


def teacher_completion(world, q):
    """The completion an LLM teacher would return for `q` (METHOD 3.3): Key Information, then the gold option's
    explanation first and the others in letter order, as the user scaffold lays them out (METHOD 3.1). The Key
    Information states the animal's facts; the explanations use them but refer to the animal as "it" (A22)."""
    a, kind = world.animal[q.id]
    habitat, size = world.habitat[a], world.size[a]
    because = f"it lives in the {habitat}"
    if kind == "eat":
        because += f" and is {size}, so it eats {food_of(habitat, size)}"
    because += f" ({q.answer})"
    lines = [f"Key Information: the {a} lives in the {habitat} and is {size}."]
    for letter in [q.answer] + [x for x in LETTERS[:len(q.choices)] if x != q.answer]:
        if letter == q.answer:
            lines.append(f"{letter} is correct. Because {because}.")
        else:
            lines.append(f"{letter} is incorrect. Because {because}, not this one.")
    lines[1] = "Explanations: " + lines[1]
    return "\n".join(lines)


# ---------------------------------------------------------------- Tailored Learning's built-in teacher (tailored.py)
# Both completions are read back from teacher_completion, so they say whatever the world's rationales say. They are
# written in the official CSQA chain-of-thought format (METHOD 10.2) and go through teacher.py's parser.

def _reasons(world, q):
    """(Key Information, {letter: reason}) of teacher_completion, read back from its METHOD 3.3 layout. Option
    letters inside the text are dropped: the official format names the letter once, at the end, where it is parsed."""
    text = re.sub(r" \([A-E]\)", "", teacher_completion(world, q))
    key = " ".join(text.split("Explanations:")[0].replace("Key Information:", "").split())
    reasons = dict(re.findall(r"([A-E]) is (?:correct|incorrect)\. Because (.*)", text))
    return key, reasons


def _rationale(world, q, wrong=None):
    """Key Information, the gold option's reason, why option `wrong` is not the answer when given, the conclusion."""
    key, reasons = _reasons(world, q)
    parts = [with_period(key), with_period(reasons[q.answer])]
    if wrong:
        parts.append(f"Not {q.choices[LETTERS.index(wrong)]}: {with_period(reasons[wrong])}")
    answer = q.choices[LETTERS.index(q.answer)]
    return " ".join(parts + [f"Therefore, the answer is {answer} ({q.answer.lower()})."])


def cot_completions(world, q, n):
    """n distinct round-1 rationales (tailored.COT_N): the gold reason alone, then with one other option ruled out."""
    others = [letter for letter in LETTERS[:len(q.choices)] if letter != q.answer]
    return [_rationale(world, q, wrong) for wrong in [None, *others][:n]]


def feedback_completion(world, q, wrong):
    """The teacher's answer to a feedback request: the error named, then a rationale that rules out the very option
    the student's wrong rationale chose."""
    chose = parse_cot(wrong, q)
    if chose is None:
        return "Error: the rationale reaches no answer.\nAnswer: " + _rationale(world, q)
    return (f"Error: the answer is not {q.choices[LETTERS.index(chose)]} ({chose.lower()}).\nAnswer: "
            + _rationale(world, q, chose))


if __name__ == "__main__":
    w = make_world()
    print(f"{len(w.train)} train, {len(w.valid)} valid, {len(w.test)} test questions")
    for q in [w.train[0], next(q for q in w.train if w.animal[q.id][1] == "where"), w.test[0]]:
        print(f"\n{q}\n{teacher_completion(w, q)}")
