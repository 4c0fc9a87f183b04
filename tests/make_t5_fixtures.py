"""Write the golden T5 fixtures under tests/fixtures/ with transformers (the reference), so tests/test_t5.py can check
logits, loss and greedy ids where transformers is not installed. Run from the repo root:

    python tests/make_t5_fixtures.py

Two tiny random checkpoints, saved by transformers and then given the config.json styles found on the Hub:
  t5_relu/   original T5: ReLU, tied lm_head + d_model**-0.5 rescale, num_heads*d_kv (24) != d_model (16), and an
             old-style config.json without feed_forward_proj / tie_word_embeddings / relative_attention_max_distance
  t5_gated/  T5 v1.1 / FLAN-T5: gated-GELU, separate lm_head, config.json with tie_word_embeddings false
and for each, t5_<name>_expected.safetensors: a padded batch of 140 input / 130 target tokens (past the 128 bucket
boundary), the reference's logits and loss on it, and its greedy generation (30 new tokens, start token dropped).
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import T5Config, T5ForConditionalGeneration

FIXTURES = Path(__file__).parent / "fixtures"
OLD_STYLE_DROPPED = ("feed_forward_proj", "tie_word_embeddings", "relative_attention_max_distance",
                     "scale_decoder_outputs", "dense_act_fn", "is_gated_act")


def tiny_hf_model(gated, seed, separate_head=True, **config):
    """A random transformers T5 (eager attention) small enough for a test. The v1.1 variant gets its own lm_head
    unless separate_head=False (transformers 5 ties it to the embedding even when asked not to). RMSNorm weights
    are drawn N(0, 1) instead of ones, so that greedy decoding of a random model does not just repeat one token."""
    torch.manual_seed(seed)
    config = dict(vocab_size=64, d_model=16, d_kv=12, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0,
                  feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=not gated,
                  decoder_start_token_id=0) | config
    model = T5ForConditionalGeneration(T5Config(**config, attn_implementation="eager")).eval()
    with torch.no_grad():
        if gated and separate_head:
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.normal_(0, 1)
    return model


def make(name, gated, seed):
    model = tiny_hf_model(gated, seed)
    directory = FIXTURES / f"t5_{name}"
    model.save_pretrained(directory)
    (directory / "generation_config.json").unlink(missing_ok=True)
    config = json.loads((directory / "config.json").read_text())
    if gated:
        config["tie_word_embeddings"] = False
        config.pop("scale_decoder_outputs")
    else:
        config = {k: v for k, v in config.items() if k not in OLD_STYLE_DROPPED}
    (directory / "config.json").write_text(json.dumps(config, indent=2))

    reference = T5ForConditionalGeneration.from_pretrained(directory, attn_implementation="eager").eval()
    input_ids = torch.randint(3, 64, (2, 140))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 90:] = 0
    input_ids[1, 90:] = 0
    labels = torch.randint(2, 64, (2, 130))
    labels[1, 100:] = -100
    with torch.no_grad():
        out = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        greedy = reference.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=30,
                                    do_sample=False)
    save_file({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
               "logits": out.logits.contiguous(), "loss": out.loss.reshape(1), "greedy_ids": greedy[:, 1:].contiguous()},
              FIXTURES / f"t5_{name}_expected.safetensors")


if __name__ == "__main__":
    make("relu", gated=False, seed=21)
    make("gated", gated=True, seed=15)
    for path in sorted(FIXTURES.glob("t5_*")):
        size = sum(p.stat().st_size for p in path.rglob("*")) if path.is_dir() else path.stat().st_size
        print(f"{path.relative_to(FIXTURES.parent.parent)}: {size / 1024:.0f} KiB")
