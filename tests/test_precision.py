"""Precision on the CPU: T5.amp_dtype's bf16 and fp16 autocast in forward, training and generate, the fp16 overflow
clamp; and a source check that the model's tensors are made on their device, not on the CPU and then moved."""

import ast
from pathlib import Path

import pytest
import torch

import t5

ROOT = Path(__file__).resolve().parent.parent
FP16_MAX = torch.finfo(torch.float16).max


def tiny(feed_forward_proj="relu", seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0,
                  feed_forward_proj=feed_forward_proj, tie_word_embeddings=feed_forward_proj == "relu")
    return t5.T5(t5.T5Config(**{**config, **overrides}))


def batch(b=4, s=10, t=7):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (b, s), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = torch.randint(3, 64, (b, t), generator=g)
    labels[2, 5:] = -100
    return ids, mask, labels


def relative_error(x, reference):
    return ((x.float() - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
def test_fp16_clamp_keeps_an_overflowing_feed_forward_finite(feed_forward_proj, monkeypatch):
    """The encoder's first feed-forward is scaled so its fp32 output peaks at 1.2 x fp16's max. Under CPU fp16
    autocast that output is inf, and without the clamp the logits go NaN at the next RMSNorm; with it they are finite
    and near the fp32 ones (measured: within 6% of the logits' range, the same argmax almost everywhere; unscaled,
    fp16 is within 0.2%)."""
    model = tiny(feed_forward_proj).eval()
    ids, mask, labels = batch()
    decoder_ids = t5.shift_right(labels)
    ff = model.encoder.block[0].layer[-1].DenseReluDense
    peaks = []
    ff.register_forward_hook(lambda module, args, out: peaks.append(out.abs().max().item()))
    with torch.no_grad():
        model(ids, mask, decoder_ids)
        ff.wo.weight *= 1.2 * FP16_MAX / peaks[-1]
        reference, _ = model(ids, mask, decoder_ids)
        assert peaks[-1] > FP16_MAX
        model.amp_dtype = torch.float16
        guarded, _ = model(ids, mask, decoder_ids)
        assert peaks[-1] == float("inf")  # fp16 really overflowed
        monkeypatch.setattr(t5.T5Block, "residual", lambda self, h, out: h + self.dropout(out))
        unguarded, _ = model(ids, mask, decoder_ids)
    assert not unguarded.isfinite().all()
    assert guarded.dtype == torch.float16 and guarded.isfinite().all()
    assert relative_error(guarded, reference) < 0.1
    assert (guarded.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_step_on_cpu(feed_forward_proj, dtype):
    """One AdamW step under CPU autocast (fp16 through torch.amp.GradScaler("cpu")) against fp32 from the same
    weights. Loss within 0.5% (bf16) / 0.1% (fp16) of fp32's (measured: up to 0.12% / 0.013%), gradients finite and
    pointing the same way (cosine >= 0.99; measured >= 0.998), and a step taken. GradScaler may skip steps whose scaled
    gradients overflow fp16, halving its scale each time (gated seed 0 skips its first); a few tries must do."""
    ids, mask, labels = batch()
    reference = tiny(feed_forward_proj).train()
    reference_loss = reference(ids, mask, labels=labels)[1]
    reference_loss.backward()
    reference_grad = torch.cat([p.grad.flatten() for p in reference.parameters()])

    model = tiny(feed_forward_proj).train()
    model.amp_dtype = dtype
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(4):
        optimizer.zero_grad()
        loss = model(ids, mask, labels=labels)[1]
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        scaler.step(optimizer)
        scaler.update()
        if (scaler.get_scale() if scaler.is_enabled() else 1.0) == scale:  # not lowered: the step was taken
            break
    assert loss.dtype == torch.float32
    tolerance = 5e-3 if dtype == torch.bfloat16 else 1e-3
    assert abs(loss.item() - reference_loss.item()) <= tolerance * reference_loss.item()
    assert grad.isfinite().all()
    assert torch.nn.functional.cosine_similarity(grad, reference_grad, 0) >= 0.99
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_generation_on_cpu(feed_forward_proj, dtype):
    """generate under CPU autocast really computes in `dtype` (a linear layer's output), gives the fp32 shape, and
    mostly fp32's greedy tokens: a rounding flip changes the rest of its row, so the bound is loose (measured on
    seeds 0-3: fp16 every token; bf16 84-100%)."""
    model = tiny(feed_forward_proj, d_model=32, d_ff=64, num_heads=4, eos_token_id=-1).eval()  # rows run to the end
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (16, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 8:] = 0
    reference = model.generate(ids, mask, 20)
    assert len(set(reference.flatten().tolist())) > 5  # not one repeated token
    dtypes = set()
    model.decoder.block[0].layer[-1].DenseReluDense.wo.register_forward_hook(
        lambda module, args, out: dtypes.add(out.dtype))
    model.amp_dtype = dtype
    out = model.generate(ids, mask, 20)
    assert dtypes == {dtype}
    assert out.shape == reference.shape == (16, 20)
    assert (out == reference).float().mean() >= (0.95 if dtype == torch.float16 else 0.7)


def test_autocast_follows_amp_dtype_and_yields_to_the_caller():
    model = tiny()
    cpu = torch.device("cpu")
    with model.autocast(cpu):
        assert not torch.is_autocast_enabled("cpu")  # amp_dtype None: fp32
    model.amp_dtype = torch.bfloat16
    with model.autocast(cpu):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with torch.autocast("cpu", torch.float16), model.autocast(cpu):
        assert torch.get_autocast_dtype("cpu") == torch.float16


# ---------------------------------------------------------------------------------------------------------------------
# Tensors made on their device

FACTORIES = {"zeros", "ones", "full", "empty", "arange", "tensor", "randn", "rand", "randint", "randperm", "eye",
             "linspace", "empty_strided"}  # torch.*_like and x.new_* inherit x's device
ALLOWED = {  # (file, enclosing function, torch.<factory>): why it needs no device
    ("t5.py", "T5LayerNorm.__init__", "ones"): "a parameter: made where the module is built, moved with it",
    ("t5.py", "embedding", "empty"): "a parameter: made where the module is built, moved with it",
    ("files.py", "read_safetensors", "empty"): "a checkpoint's empty tensor, read on the CPU like the others",
    ("t5.py", "Tokenizer.__call__", "tensor"): "the tokenizer's batch, on the CPU; its caller moves it once",
}


def factory_calls_without_device(path):
    """[(function, factory, line)] of torch.<factory>(...) calls in `path` without a device= keyword."""
    found = []

    def visit(node, scope):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, f"{scope}.{child.name}" if scope else child.name)
                continue
            if (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
                    and isinstance(child.func.value, ast.Name) and child.func.value.id == "torch"
                    and child.func.attr in FACTORIES and "device" not in {k.arg for k in child.keywords}):
                found.append((scope, child.func.attr, child.lineno))
            visit(child, scope)
    visit(ast.parse(path.read_text()), "")
    return found


@pytest.mark.parametrize("name", ["files.py", "t5.py", "dpo.py", "triplet.py", "train.py", "evaluate.py"])
def test_tensors_are_made_on_their_device(name):
    """torch.zeros/ones/full/empty/arange/tensor/rand*/eye/... name their device=: made on the CPU and then moved,
    a tensor costs a host-to-device copy (and a sync) in every step it is made in. ALLOWED lists the exceptions."""
    found = factory_calls_without_device(ROOT / name)
    allowed = {(function, factory) for file, function, factory in ALLOWED if file == name}
    assert [f"{name}:{line} torch.{factory} in {function or 'module'}" for function, factory, line in found
            if (function, factory) not in allowed] == []
    assert allowed <= {(function, factory) for function, factory, _ in found}, "an ALLOWED entry no longer applies"
