"""T5 in plain PyTorch: the model, its generation and its tokenizer.

Numerically the same as Hugging Face transformers' T5ForConditionalGeneration, with the same parameter names, for
original T5 (ReLU feed-forward, lm_head tied to the embedding) and T5 v1.1 / FLAN-T5 (gated-GELU feed-forward,
separate lm_head). Reads top to bottom in the order of the math: config, RMSNorm, relative position buckets,
attention, feed-forward, block, stack, generation's caches, model (forward, loss, generate, from_pretrained), then
the sentencepiece tokenizer. The checkpoint files and the Hub download are files.py's.

Precision: the weights' dtype (fp32) unless model.amp_dtype names an autocast dtype, bf16 or fp16, on CPU or CUDA
(RMSNorm statistics, softmax and the loss stay fp32). In fp16 each block clamps its hidden states to fp16's range, as
transformers does: T5's feed-forward activations overflow it.
"""

import contextlib
import io
import json
import math
import re
import sys
import typing
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F
from torch import nn

from files import LoadError, atomic_write, model_file, parse, read_checkpoint, read_json, resolve_model_directory, \
    write_safetensors


@dataclass
class T5Config:
    """Hyper-parameters under their config.json names. The defaults are transformers' T5Config defaults, which is
    also what older config.json files mean when they omit a key (feed_forward_proj "relu", tie_word_embeddings true,
    relative_attention_max_distance 128)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64  # per head; num_heads * d_kv need not equal d_model (flan-t5-small: 6 * 64 = 384 != 512)
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None: same as num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu" (T5) or "gated-gelu" (v1.1, FLAN-T5)
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool | None = None  # decoder output * d_model**-0.5; None: same as tie_word_embeddings
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    def __post_init__(self):
        for f in fields(self):  # "d_model": "512" fails here, by name, rather than deep inside nn.Linear
            value, allowed = getattr(self, f.name), typing.get_args(f.type) or (f.type,)
            allowed += (int,) * (float in allowed)
            if not isinstance(value, allowed) or isinstance(value, bool) and bool not in allowed:  # true is an int
                raise ValueError(f"field {f.name} should be {f.type.__name__ if isinstance(f.type, type) else f.type}, "
                                 f"got {value!r}")
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        # transformers 5 always ties its lm_head and records the Mesh-TF rescale in its own key, so configs it
        # writes for v1.1 models say tie_word_embeddings true + scale_decoder_outputs false.
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_word_embeddings
        if self.feed_forward_proj not in ("relu", "gated-gelu"):
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r} is not supported: "
                             "T5 uses 'relu', T5 v1.1 and FLAN-T5 use 'gated-gelu'")
        # Values a checkpoint's config.json could hold that no T5 has: each named here rather than met as a NaN in
        # training or a crash in a layer (json reads NaN and Infinity).
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads"):
            if not 1 <= getattr(self, name) < 2 ** 31:
                raise ValueError(f"field {name} must be from 1 to 2**31 - 1, got {getattr(self, name)}")
        if not 4 <= self.relative_attention_num_buckets < self.relative_attention_max_distance * 2 < 2 ** 31:
            raise ValueError("fields relative_attention_num_buckets and relative_attention_max_distance must be at "
                             "least 4 and above half the buckets, got "
                             f"{self.relative_attention_num_buckets} and {self.relative_attention_max_distance}")
        for name in ("pad_token_id", "decoder_start_token_id"):  # embedded (eos is only compared with)
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"field {name} must be an id below vocab_size {self.vocab_size}, "
                                 f"got {getattr(self, name)}")
        if not 0 <= self.dropout_rate < 1:
            raise ValueError(f"field dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if not 0 < self.layer_norm_epsilon < math.inf:
            raise ValueError(f"field layer_norm_epsilon must be a finite number above 0, got {self.layer_norm_epsilon}")

    @classmethod
    def from_dict(cls, d, source="config"):
        if not isinstance(d, dict):
            raise LoadError(f"{source}: not a JSON object of settings")
        known = {f.name for f in fields(cls)}
        d = dict(d)
        # Early FLAN-T5 configs said "gelu" + is_gated_act; the Hub fixed them to "gated-gelu" (the weights were
        # trained with the tanh GELU).
        if d.get("feed_forward_proj") == "gelu" and d.get("is_gated_act"):
            d["feed_forward_proj"] = "gated-gelu"
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except (TypeError, ValueError) as e:
            raise LoadError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path):
        try:
            d = read_json(Path(path).read_bytes())
        except ValueError as e:  # UnicodeDecodeError too
            raise LoadError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self):
        return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "is_encoder_decoder": True,
                **asdict(self)}


class T5LayerNorm(nn.Module):
    """RMSNorm: y = w * x / sqrt(mean(x^2) + eps). T5 quirk: no mean subtraction and no bias; the mean of squares
    is taken in fp32 whatever the input dtype."""

    def __init__(self, d_model, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x):
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


def relative_position_bucket(relative_position, bidirectional, num_buckets, max_distance):
    """Bucket of key_position - query_position: distances below num_buckets/2 get a bucket each, larger ones share
    log-spaced buckets up to max_distance, beyond which all share the last. The encoder (bidirectional) spends half
    of the buckets on each side; the decoder sees only the past and uses all of them. The log is taken in float32
    and truncated as Mesh-TF does, so distances at bucket boundaries land where transformers puts them."""
    bucket = 0
    if bidirectional:
        num_buckets //= 2
        bucket = (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < max_exact, distance, large)


def attention(q, k, v, bias, dropout_p, sdpa):
    """softmax(q k^T + bias) v per head, q/k/v [B, H, T, d_kv]. T5 quirk: no 1/sqrt(d_kv) (it is folded into q's
    initialisation), so SDPA runs with scale=1.0 and the position bias + mask as its additive float mask. The eager
    form is the reference: softmax in fp32, then cast back."""
    if sdpa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout_p, scale=1.0)
    scores = q @ k.transpose(-1, -2) + bias
    probs = scores.float().softmax(-1).to(v.dtype)
    return F.dropout(probs, dropout_p) @ v


def embedding(rows, dim):
    """nn.Embedding without a draw on the meta device, where from_pretrained builds (a meta normal_ imports the slow
    torch._dynamo); elsewhere the draw nn.Embedding makes, so a seed keeps its weights."""
    weight = torch.empty(rows, dim)
    if not weight.is_meta:
        nn.init.normal_(weight)
    return nn.Embedding(rows, dim, _weight=weight)


class T5Attention(nn.Module):
    """Multi-head attention with q, k, v: d_model -> num_heads*d_kv and o back. T5 quirk: the relative position
    bias table lives only in the first block's self-attention; its bias (with the mask added) is computed once per
    stack and shared by every block. Cross-attention has no position bias."""

    def __init__(self, config, has_relative_attention_bias=False):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = embedding(config.relative_attention_num_buckets, config.num_heads)
        self.num_heads, self.d_kv, self.dropout = config.num_heads, config.d_kv, config.dropout_rate

    def split_heads(self, x):  # [B, T, H*d_kv] -> [B, H, T, d_kv]
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.d_kv).transpose(1, 2)

    def project_kv(self, x, rows=None):
        if rows is None:
            return self.split_heads(self.k(x)), self.split_heads(self.v(x))
        return self.split_heads(rows.unpack(self.k(x))), self.split_heads(rows.unpack(self.v(x)))

    def forward(self, x, k, v, bias, rows=None):
        """x [B, T, d_model]; or, with `rows`, tokens x [..., d_model] that rows places in the [B, T] grid of k and v
        for attention and gathers back (the real tokens of a padded batch, or the decoding copies of each prompt)."""
        q = self.split_heads(self.q(x) if rows is None else rows.unpack(self.q(x)))
        # SDPA wherever it is valid: not in fp16, where the float32-min mask becomes -inf and a fully masked row NaN;
        # and not for training on CPU, where the eager form's backward is faster.
        sdpa = q.dtype != torch.float16 and (q.is_cuda or not torch.is_grad_enabled())
        out = attention(q, k, v, bias, self.dropout if self.training else 0.0, sdpa).transpose(1, 2)
        out = out.reshape(*out.shape[:2], -1)
        return self.o(out if rows is None else rows.pack(out).view(*x.shape[:-1], -1))


class T5DenseReluDense(nn.Module):
    """Feed-forward: wo(relu(wi x)) for T5, wo(gelu(wi_0 x) * wi_1 x) for v1.1/FLAN-T5 ("gated-gelu"). T5 quirks:
    the gated variant's GELU is the tanh approximation (transformers' gelu_new), and the module keeps the name
    DenseReluDense for both."""

    def __init__(self, config):
        super().__init__()
        self.gated = config.feed_forward_proj == "gated-gelu"
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x):
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x) if self.gated else F.relu(self.wi(x))
        return self.wo(self.dropout(h))


class T5Block(nn.Module):
    """Pre-norm residual sublayers, h = h + dropout(f(RMSNorm(h))), for f = self-attention, cross-attention
    (decoder only), feed-forward. layer[i] holds f and its layer_norm under transformers' names."""

    def __init__(self, config, is_decoder, layer_idx):
        super().__init__()
        norm = lambda: T5LayerNorm(config.d_model, config.layer_norm_epsilon)  # noqa: E731
        sublayers = [nn.ModuleDict({"SelfAttention": T5Attention(config, has_relative_attention_bias=layer_idx == 0),
                                    "layer_norm": norm()})]
        if is_decoder:
            sublayers.append(nn.ModuleDict({"EncDecAttention": T5Attention(config), "layer_norm": norm()}))
        sublayers.append(nn.ModuleDict({"DenseReluDense": T5DenseReluDense(config), "layer_norm": norm()}))
        self.layer = nn.ModuleList(sublayers)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.layer_idx = layer_idx

    def forward(self, h, bias, cross_kv=None, cross_mask=None, cache=None, rows=None, cross_rows=None):
        """cache: a KVCache when decoding one token. rows: h holds only the real tokens of these Rows; every sublayer
        but attention is per token. cross_rows: where h's rows sit among cross_kv's prompts, if not `rows`
        (T5.generate's copies of one prompt)."""
        attn = self.layer[0]
        x = attn.layer_norm(h)
        k, v = attn.SelfAttention.project_kv(x, rows)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        h = self.residual(h, attn.SelfAttention(x, k, v, bias, rows))
        if cross_kv is not None:
            cross = self.layer[1]
            h = self.residual(h, cross.EncDecAttention(cross.layer_norm(h), *cross_kv, cross_mask,
                                                       rows if cross_rows is None else cross_rows))
        ff = self.layer[-1]
        return self.residual(h, ff.DenseReluDense(ff.layer_norm(h)))

    def residual(self, h, out):
        """h + dropout(out), clamped to fp16's range less 1000 when `out` was computed in fp16, as transformers does:
        T5's activations overflow fp16 (transformers#9295), and an inf turns into NaN at the next RMSNorm."""
        h = h + self.dropout(out)
        if out.dtype == torch.float16:
            bound = torch.finfo(torch.float16).max - 1000
            h = h.clamp(-bound, bound)
        return h


class T5Stack(nn.Module):
    """Encoder or decoder: dropout(embeddings) -> blocks -> final RMSNorm -> dropout. No absolute positions and no
    sqrt(d_model) embedding scale; position enters only through the relative bias."""

    def __init__(self, config, is_decoder):
        super().__init__()
        n = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = nn.ModuleList(T5Block(config, is_decoder, i) for i in range(n))
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.is_decoder = is_decoder
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance

    def position_bias(self, length):
        """[1, H, length, length] bias of query i for key j; the decoder's also masks the future (j > i)."""
        table = self.block[0].layer[0].SelfAttention.relative_attention_bias
        position = torch.arange(length, device=table.weight.device)
        relative = position[None, :] - position[:, None]
        buckets = relative_position_bucket(relative, not self.is_decoder, self.num_buckets, self.max_distance)
        bias = table(buckets).permute(2, 0, 1).unsqueeze(0)
        if self.is_decoder:
            bias = bias.masked_fill(relative > 0, torch.finfo(bias.dtype).min)
        return bias

    def cross_kv(self, encoder_states):
        """Keys and values of every block's cross-attention, computed once from the encoder output."""
        return [block.layer[1].EncDecAttention.project_kv(encoder_states) for block in self.block]

    def forward(self, h, bias, cross_kv=None, cross_mask=None, cache=None, rows=None, cross_rows=None):
        h = self.dropout(h)
        for i, block in enumerate(self.block):
            h = block(h, bias, cross_kv and cross_kv[i], cross_mask, cache, rows, cross_rows)
        return self.dropout(self.final_layer_norm(h))


class Rows:
    """The real positions of a padded [B, T] batch. The linear layers, norms and dropout run on those N tokens only,
    packed as [N, d]; attention scatters them back to [B, T] (the unpadding of ModernBERT and MosaicBERT), so padding
    costs no work. Padded keys are masked (encoder) or in the future (decoder): their zeros never reach a real token."""

    def __init__(self, keep):
        self.shape = keep.shape
        self.index = keep.flatten().nonzero()[:, 0]

    def pack(self, x):  # [B, T, ...] -> [N, ...]
        return x.flatten(0, 1)[self.index]

    def unpack(self, x):  # [N, k] (or any [..., k] of N tokens) -> [B, T, k] with zeros at the padding
        x = x.reshape(-1, x.shape[-1])
        return x.new_zeros(self.shape.numel(), x.shape[1]).index_copy(0, self.index, x).view(*self.shape, -1)

    @classmethod
    def copies(cls, prompt):
        """The [P, G] grid of decoding rows whose prompts are `prompt` (sorted ids 0..P-1, every one present): row p
        holds prompt p's copies, G the most copies of any prompt. Cross-attention then reads each prompt's keys and
        values once for all its copies, as G queries (no position bias or causal mask there, so the same sums)."""
        count = torch.bincount(prompt)
        copy = torch.arange(len(prompt), device=prompt.device) - (count.cumsum(0) - count)[prompt]
        keep = torch.zeros(len(count), int(count.max()), dtype=torch.bool, device=prompt.device)
        return cls(keep.index_put_((prompt, copy), torch.ones_like(prompt, dtype=torch.bool)))


def shift_right(labels, decoder_start_token_id=0, pad_token_id=0):
    """Teacher-forcing decoder inputs: the start token, then labels[:-1]; ignored labels (-100) become pad."""
    shifted = labels.new_full(labels.shape, decoder_start_token_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad_token_id)


def additive_mask(attention_mask):
    """[B, S] 1/0 mask -> [B, 1, 1, S] with 0 to keep and the most negative float32 to drop (finite, as transformers
    does, so a fully padded row stays finite)."""
    return (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


def sample(logits, temperature, top_k, generator=None):
    """One token per row from softmax(logits / temperature), restricted to the top_k most likely tokens (0: all).
    Drawn as argmax(p / E), E ~ Exp(1) from `generator` (the exponential race: multinomial's distribution without
    its host sync)."""
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = logits.softmax(-1)
    return (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(-1)


PREFILL_TOKENS = 1024  # CPU: the encoder's chunk in generate (T5.prefill)
DROP_FINISHED_AFTER = 1.0  # compact once finished rows have idled this many steps' worth of the batch; inf: never


def keep_rows(buffer, keep, length):
    """buffer[:len(keep)], now holding rows `keep` of `buffer` at positions [:length] of dim 2 (moved in place)."""
    buffer[:len(keep), :, :length] = buffer[keep, :, :length]
    return buffer[:len(keep)]


class KVCache:
    """Self-attention keys and values of every decoder block, [rows, H, max_len, d_kv] buffers written by index as
    gpt-fast's are; a block calls update(k, v, layer_idx), transformers' Cache protocol. Step t (`at(t)`) writes
    position t and attends to positions 0..t, with row t of the decoder's position bias."""

    def __init__(self, model, rows, max_len, dtype):
        c, device = model.config, model.shared.weight.device
        self.k, self.v = ([torch.empty(rows, c.num_heads, max_len, c.d_kv, dtype=dtype, device=device)
                           for _ in model.decoder.block] for _ in "kv")
        self.bias = model.decoder.position_bias(max_len)
        self.t = 0

    def at(self, t):
        self.t = t
        return self

    def position_bias(self):
        return self.bias[:, :, self.t:self.t + 1, :self.t + 1]

    def update(self, k, v, layer_idx):
        """Write block layer_idx's key and value [rows, H, 1, d_kv] at position t; its keys and values 0..t."""
        t, cache_k, cache_v = self.t, self.k[layer_idx], self.v[layer_idx]
        cache_k[:, :, t:t + 1] = k
        cache_v[:, :, t:t + 1] = v
        return cache_k[:, :, :t + 1], cache_v[:, :, :t + 1]

    def keep(self, rows):
        """Keep only `rows`, moved to the front of the same buffers, so a row's arithmetic is unchanged."""
        self.k, self.v = ([keep_rows(b, rows, self.t + 1) for b in buffers] for buffers in (self.k, self.v))


class StaticKVCache(KVCache):
    """KVCache in the fixed shapes a CUDA graph replays: the position is a tensor (an int would recompile every step),
    and attention reads all max_len positions, the future masked by the position bias. Zeroed: 0 * NaN from empty
    memory would still be NaN."""

    def __init__(self, model, rows, max_len, dtype):
        super().__init__(model, rows, max_len, dtype)
        for buffer in self.k + self.v:
            buffer.zero_()
        self.position = torch.zeros(1, dtype=torch.long, device=self.bias.device)

    def at(self, t):
        self.position.fill_(t)
        return self

    def position_bias(self):
        return self.bias.index_select(2, self.position)

    def update(self, k, v, layer_idx):
        self.k[layer_idx].index_copy_(2, self.position, k)
        self.v[layer_idx].index_copy_(2, self.position, v)
        return self.k[layer_idx], self.v[layer_idx]


COMPILE_OPTIONS = dict(mode="reduce-overhead", fullgraph=True)  # StaticDecoder's step; on CUDA: CUDA graphs


class StaticDecoder:
    """gpt-fast's decode path, for small batches on a GPU, where a step is many kernel launches of little work each.
    Every tensor the step reads sits at a fixed address in a fixed shape (each block's cross-attention keys/values,
    the mask, a StaticKVCache), so the torch.compile'd step (COMPILE_OPTIONS) is captured once as a CUDA graph and
    replayed as one launch. Finished rows stay in the batch. One per shape (rows, prompt length, max_new_tokens) and
    dtype, kept by the model: a new shape compiles anew; a stale cache from an earlier call is masked as the future.
    No command decodes through it: validation, sampling and evaluation decode batches of up to 256 ragged prompts,
    large enough that launches are not the cost, and there the plain path drops finished rows while this one decodes
    every row to the end and compiles each new shape. bench.py --variants compile measures it (on a GPU: not yet)."""

    def __init__(self, model, cross_kv, mask, max_new_tokens):
        self.cross_kv = [(torch.empty_like(k), torch.empty_like(v)) for k, v in cross_kv]  # filled by load
        self.mask = torch.empty_like(mask)
        self.cache = cache = StaticKVCache(model, len(mask), max_new_tokens, cross_kv[0][0].dtype)
        for tensor in [self.mask, cache.bias, cache.position, *cache.k, *cache.v, *sum(self.cross_kv, ())]:
            torch._dynamo.mark_static_address(tensor)  # inputs a CUDA graph may keep and write, not copy
        self.step = torch.compile(lambda token: model.decode_step(token, cache, self.cross_kv, self.mask),
                                  **COMPILE_OPTIONS)

    def load(self, cross_kv, mask):
        for (k, v), (new_k, new_v) in zip(self.cross_kv, cross_kv):
            k.copy_(new_k)
            v.copy_(new_v)
        self.mask.copy_(mask)
        return self

    def __call__(self, token, t):
        """logits [rows, vocab] of the token at position t, given tokens 0..t-1 of this call."""
        self.cache.at(t)
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are no longer read
        return self.step(token)


@contextlib.contextmanager
def eval_mode(model):
    """Switch dropout off for a while (generate may be called from a training loop)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class T5(nn.Module):
    """logits = lm_head(decoder(shared(shift_right(labels)), encoder(shared(input_ids)))). T5 quirk: when lm_head is
    the embedding (original T5) the decoder output is first multiplied by d_model**-0.5 (Mesh-TF convention)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.shared = embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, is_decoder=False)
        self.decoder = T5Stack(config, is_decoder=True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight
        if not self.shared.weight.is_meta:  # from_pretrained builds on the meta device, then assigns the checkpoint
            self.init_weights()
        self.static_decoders = {}  # generate(compiled=True)'s StaticDecoder per shape

    @torch.no_grad()
    def init_weights(self):
        """Mesh-TF initialisation: N(0, 1) embeddings and each projection N(0, fan_in**-0.5), except q, which also
        takes the missing attention scale: N(0, (d_model * d_kv)**-0.5)."""
        c = self.config
        self.shared.weight.normal_(0, 1.0)
        self.lm_head.weight.normal_(0, 1.0)  # a no-op redraw of `shared` when tied
        for m in self.modules():
            if isinstance(m, T5Attention):
                m.q.weight.normal_(0, (c.d_model * c.d_kv) ** -0.5)
                m.k.weight.normal_(0, c.d_model ** -0.5)
                m.v.weight.normal_(0, c.d_model ** -0.5)
                m.o.weight.normal_(0, (c.num_heads * c.d_kv) ** -0.5)
                if hasattr(m, "relative_attention_bias"):
                    m.relative_attention_bias.weight.normal_(0, c.d_model ** -0.5)
            elif isinstance(m, T5DenseReluDense):
                for name in ("wi", "wi_0", "wi_1"):
                    if hasattr(m, name):
                        getattr(m, name).weight.normal_(0, c.d_model ** -0.5)
                m.wo.weight.normal_(0, c.d_ff ** -0.5)

    amp_dtype = None  # forward's and generate's autocast dtype (bf16 or fp16, CPU or CUDA); None: the weights' dtype

    def autocast(self, device):
        """Autocast to amp_dtype on `device`, unless it is None or the caller already opened an autocast there."""
        if self.amp_dtype is None or torch.is_autocast_enabled(device.type):
            return contextlib.nullcontext()
        return torch.autocast(device.type, self.amp_dtype)

    def encode(self, input_ids, attention_mask):
        """Encoder output [B, S, d_model] and the additive padding mask [B, 1, 1, S] for attending to it."""
        mask, rows = additive_mask(attention_mask), Rows(attention_mask.bool())
        h = self.encoder(self.shared(rows.pack(input_ids)), self.encoder.position_bias(input_ids.shape[1]) + mask,
                         rows=rows)
        return rows.unpack(h), mask

    def decoder_states(self, decoder_input_ids, encoder_states, mask, rows=None):
        """The decoder's final hidden states [B, T, d_model], after its final RMSNorm (and dropout), given `encode`'s
        outputs: transformers' decoder_hidden_states[-1]; with `rows`, only theirs, packed [N, d_model]. Tailored
        Learning's self-reflection loss reads them."""
        embedded = self.shared(decoder_input_ids if rows is None else rows.pack(decoder_input_ids))
        with self.autocast(decoder_input_ids.device):
            return self.decoder(embedded, self.decoder.position_bias(decoder_input_ids.shape[1]),
                                self.decoder.cross_kv(encoder_states), mask, rows=rows)

    def lm_logits(self, h):
        if self.config.scale_decoder_outputs:
            h = h * self.config.d_model ** -0.5
        return self.lm_head(h)

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None, labels=None):
        """(logits [B, T, vocab], None) without labels. With labels: (logits [N, vocab] of the N labelled positions
        only, in the order of labels[labels != -100], and their mean cross-entropy); -100 marks padding."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5.forward needs decoder_input_ids or labels (shifted right to make them)")
            decoder_input_ids = shift_right(labels, self.config.decoder_start_token_id, self.config.pad_token_id)
        # With labels the decoder runs only up to each row's last label (later positions cannot reach it), and
        # lm_head and the loss only on the labelled positions.
        keep = torch.ones_like(decoder_input_ids, dtype=torch.bool) if labels is None else \
            (labels != -100).flip(1).cummax(1).values.flip(1)
        rows = Rows(keep)
        with self.autocast(input_ids.device):
            encoder_states, mask = self.encode(input_ids, attention_mask)
            h = self.decoder_states(decoder_input_ids, encoder_states, mask, rows)
            if labels is None:
                return self.lm_logits(h).view(*keep.shape, -1), None
            labels = rows.pack(labels)
            logits = self.lm_logits(h[labels != -100])
        return logits, F.cross_entropy(logits.float(), labels[labels != -100])

    def prefill(self, input_ids, attention_mask):
        """Every decoder block's cross-attention (keys, values) [P, H, S, d_kv] of the P distinct prompts among the
        rows of input_ids, their additive mask [P, 1, 1, S], and the prompt of each row [B]. Identical prompts are
        encoded and projected once: reflect samples every chain `samples` times (METHOD 7.1), so its sampling passes
        repeat each recall and each analyze prompt ten times. On CPU the encoder runs on chunks of about
        PREFILL_TOKENS tokens: a pass over a whole batch allocates large intermediates, which glibc maps fresh from
        the kernel every time and the kernel zero-fills page by page. A GPU's caching allocator has no such cost, so
        there the batch is encoded at once."""
        prompts, prompt_of = torch.unique(torch.cat([input_ids, attention_mask], 1), dim=0, return_inverse=True)
        ids, real = prompts.split(input_ids.shape[1], 1)
        chunk = len(ids) if ids.is_cuda else max(1, PREFILL_TOKENS // ids.shape[1])
        states = torch.cat([self.encode(ids[i:i + chunk], real[i:i + chunk])[0] for i in range(0, len(ids), chunk)])
        return self.decoder.cross_kv(states), additive_mask(real), prompt_of

    def decode_step(self, token, cache, cross_kv, cross_mask, cross_rows=None):
        """logits [rows, vocab] of the token after `token` [rows], which sits at the cache's position."""
        h = self.decoder(self.shared(token[:, None]), cache.position_bias(), cross_kv, cross_mask, cache,
                         cross_rows=cross_rows)
        return self.lm_logits(h[:, 0])

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=200, do_sample=False, temperature=1.0,
                 top_k=0, num_return_sequences=1, compiled=False, generator=None):
        """Greedy or sampled decoding -> [B * n, L <= max_new_tokens] new tokens (no start token); the n rows of an
        input are adjacent; each row ends with its </s> and is padded with 0 after it. Runs in eval mode; every
        sampled draw comes from `generator` (on the model's device) when given, else from torch's global one.
        Prefill (T5.prefill): the encoder runs once per distinct prompt and every block's cross-attention keys/values
        are projected once. Decode: one token per step through a KVCache. The copies of a prompt (n of each input, or
        repeated inputs) share its cross-attention keys and values (Rows.copies). Ragged: finished rows leave the
        running batch (with their cache rows, and a prompt with its last copy), so the work follows the rows still
        writing. The loop stops when every row has produced </s>. compiled: decode through StaticDecoder's compiled
        fixed-shape step instead (every row to the end, each with its own copy of its prompt's keys and values, CUDA
        graphs on a GPU), for small batches on a GPU (StaticDecoder says why no command uses it)."""
        c = self.config
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with self.autocast(input_ids.device), eval_mode(self):
            cross_kv, mask, prompt_of = self.prefill(input_ids, attention_mask)
            # running: the row of `out` each running row writes, grouped by prompt; prompt: that row's prompt
            prompt, running = prompt_of.repeat_interleave(num_return_sequences).sort(stable=True)
            rows, dtype, device = len(running), cross_kv[0][0].dtype, mask.device
            if compiled:
                cross_kv, mask = [(k[prompt], v[prompt]) for k, v in cross_kv], mask[prompt]
                shape = (rows, mask.shape[-1], max_new_tokens, dtype, device)
                if shape not in self.static_decoders:
                    self.static_decoders[shape] = StaticDecoder(self, cross_kv, mask, max_new_tokens)
                static = self.static_decoders[shape].load(cross_kv, mask)
            else:
                cache, copies = KVCache(self, rows, max_new_tokens, dtype), Rows.copies(prompt)
            out = input_ids.new_zeros(rows, max_new_tokens)
            done = torch.zeros(rows, dtype=torch.bool, device=device)
            token = out.new_full((rows,), c.decoder_start_token_id)
            idle = 0  # row-steps spent on finished rows since the last compaction
            for t in range(max_new_tokens):
                logits = static(token, t) if compiled else self.decode_step(token, cache.at(t), cross_kv, mask, copies)
                token = sample(logits, temperature, top_k, generator) if do_sample else logits.argmax(-1)
                token = token.masked_fill(done, c.pad_token_id)
                out[running, t] = token
                done |= token == c.eos_token_id
                finished = int(done.sum())  # the one host sync per step
                if finished == len(done):
                    break
                # Drop the finished rows once the steps they idled cost as much as copying the others' caches (about
                # one step).
                idle += finished
                if idle >= len(done) * DROP_FINISHED_AFTER and not compiled:
                    keep = (~done).nonzero()[:, 0]
                    running, token, done = running[keep], token[keep], done[keep]
                    live, prompt = torch.unique(prompt[keep], return_inverse=True)
                    if len(live) < len(mask):  # a prompt lost its last copy (else its keys and values stay put)
                        cross_kv = [(keep_rows(k, live, k.shape[2]), keep_rows(v, live, v.shape[2]))
                                    for k, v in cross_kv]
                        mask = mask[live]
                    copies = Rows.copies(prompt)
                    cache.keep(keep)
                    idle = 0
        return out[:, :t + 1]

    # ----------------------------------------------------------------------------------------------------------------
    # Checkpoints: config.json + model.safetensors (or a sharded index, or pytorch_model.bin), under HF tensor names

    @classmethod
    def from_pretrained(cls, name_or_dir, dtype=None, device=None):
        """Load a local checkpoint directory or a Hub repository id (e.g. "google/flan-t5-base"), in float32 unless
        `dtype` says otherwise, in eval mode."""
        directory = resolve_model_directory(name_or_dir)
        config = parse(directory / "config.json", T5Config.from_json)
        tensors, origin = read_checkpoint(directory)
        aliases = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight") + \
            ("lm_head.weight",) * config.tie_word_embeddings
        for alias in aliases:
            if "shared.weight" not in tensors and alias in tensors:  # some files name the embedding only here
                tensors["shared.weight"], origin["shared.weight"] = tensors[alias], origin[alias]
        if (config.tie_word_embeddings and "lm_head.weight" in tensors and "shared.weight" in tensors
                and not torch.equal(tensors["lm_head.weight"], tensors["shared.weight"])):
            config.tie_word_embeddings = False  # a head that differs from the embedding is kept, as transformers does
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()
        if config.tie_word_embeddings:
            del expected["lm_head.weight"]
        dtype = dtype or torch.float32
        if dtype == torch.float16:
            warnings.warn("T5 overflows float16 (feed-forward activations exceed 65504); use bfloat16 or float32",
                          stacklevel=2)
        state, skipped = {}, []
        for name, t in tensors.items():
            if name not in expected:
                if name in UNUSED_KEYS or name == "lm_head.weight":
                    skipped.append(name)
                    continue
                raise LoadError(f"{origin[name]}: unexpected tensor {name!r} (not a T5 parameter)")
            if t.shape != expected[name].shape:
                raise LoadError(f"{origin[name]}: tensor {name!r} has shape {list(t.shape)}, but "
                                f"{directory / 'config.json'} implies {list(expected[name].shape)}")
            # a sum is quick and not finite when an element is not (or, rarely, when it overflows: then look closer)
            if t.is_floating_point() and not (t.sum().isfinite() or t.isfinite().all()):
                raise LoadError(f"{origin[name]}: tensor {name!r} holds NaN or inf")
            state[name] = t.to(device=device, dtype=dtype, copy=True)
        missing = sorted(expected.keys() - state.keys())
        if missing:
            raise LoadError(f"{directory}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
        if skipped:
            print(f"T5.from_pretrained: ignored {', '.join(sorted(skipped))} (aliases of shared.weight or the "
                  "unused cross-attention position bias of old checkpoints)", file=sys.stderr)
        model.load_state_dict(state, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.shared.weight
        return model.eval()  # as transformers does; call .train() to fine-tune

    def save_pretrained(self, directory):
        """config.json + model.safetensors, loadable by transformers; a tied lm_head is stored once, as shared."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tied = self.lm_head.weight is self.shared.weight
        config = {**self.config.to_dict(), "tie_word_embeddings": tied}
        atomic_write(directory / "config.json", json.dumps(config, indent=2).encode())
        tensors = {k: v for k, v in self.state_dict().items() if not (tied and k == "lm_head.weight")}
        write_safetensors(directory / "model.safetensors", tensors)


UNUSED_KEYS = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
               "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"}


# --------------------------------------------------------------------------------------------------------------------

class Tokenizer:
    """SentencePiece with T5's conventions: pad 0, </s> 1, <unk> 2 and no BOS inside the spm model, and 100 sentinels
    <extra_id_n> = vocab_size - 1 - n above it. encode appends </s>. Same ids and text as transformers 5's
    T5Tokenizer: special-token strings in the text are split out and each chunk between them is encoded on its own
    (so a chunk after a sentinel gets sentencepiece's leading "▁", the 'legacy' behaviour); decode drops pad, unk and
    sentinels and joins the pieces with no clean-up of spaces."""

    def __init__(self, spiece_model_path):
        self.path = Path(spiece_model_path)
        if not self.path.is_file():
            raise LoadError(f"{self.path}: sentencepiece model not found")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:  # sentencepiece's "Internal: ... could not parse ModelProto"
            raise LoadError(f"{self.path}: not a sentencepiece model ({str(e).strip()[:200]})") from None
        if (self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id()) != (0, 1, 2):
            raise LoadError(f"{self.path}: T5 needs pad/eos/unk ids 0/1/2, this model has "
                            f"{self.sp.pad_id()}/{self.sp.eos_id()}/{self.sp.unk_id()}")
        self.spm_size = self.sp.get_piece_size()
        self.vocab_size = self.spm_size + 100
        self.special = {"<pad>": 0, "</s>": 1, "<unk>": 2,
                        **{f"<extra_id_{n}>": self.vocab_size - 1 - n for n in range(100)}}

    @classmethod
    def from_pretrained(cls, name_or_dir):
        """The spiece.model of a local directory or of a Hub repository id."""
        return parse(model_file(name_or_dir, "spiece.model"), cls)

    @classmethod
    def train(cls, texts, vocab_size, directory):
        """Train a BPE spm of at most `vocab_size` pieces with T5's ids on `texts` and save it as
        directory/spiece.model; the tokenizer's vocab_size adds the 100 sentinels. BPE rather than T5's unigram:
        on a small templated corpus (the embedded world) unigram stops far below `vocab_size` and splits common
        words into characters; BPE keeps each frequent word one piece."""
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
                                       model_type="bpe", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                       hard_vocab_limit=False, minloglevel=2)
        Path(directory).mkdir(parents=True, exist_ok=True)
        atomic_write(Path(directory) / "spiece.model", model.getvalue())
        return cls(Path(directory) / "spiece.model")

    def save_pretrained(self, directory):
        Path(directory).mkdir(parents=True, exist_ok=True)
        atomic_write(Path(directory) / "spiece.model", self.sp.serialized_model_proto())

    def encode(self, text):
        ids = []
        for i, chunk in enumerate(SPECIAL_TOKEN.split(text)):
            ids.extend([self.special[chunk]] if i % 2 else self.sp.encode(chunk))
        return ids + [self.sp.eos_id()]

    def __call__(self, texts):
        """(input_ids, attention_mask), both [len(texts), longest], padded on the right with 0."""
        rows = [self.encode(t) for t in texts]
        longest = max(map(len, rows))
        ids = torch.tensor([r + [0] * (longest - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows])
        return ids, mask

    def decode(self, ids):
        """Text of the ids before the first </s>, without pad, unk, sentinels or ids past the spm vocabulary."""
        pieces = []
        for i in ids.tolist() if torch.is_tensor(ids) else ids:
            if i == self.sp.eos_id():
                break
            if 2 < i < self.spm_size:
                pieces.append(self.sp.id_to_piece(i))
        text = "".join(pieces).replace("\u2581", " ")
        return text[1:] if text.startswith(" ") else text

    def batch_decode(self, rows):
        return [self.decode(r) for r in rows]


SPECIAL_TOKEN = re.compile(r"(<extra_id_(?:[1-9]?\d)>|</s>|<pad>|<unk>)")


def truncate(ids, max_length):
    """At most max_length ids, the last one (encode's </s>) kept, as transformers' truncation keeps it: DPO's prompts
    and targets (METHOD 7.4) and the triplet loss's continuations, whose representation is the eos state (10.5)."""
    return ids if len(ids) <= max_length else ids[:max_length - 1] + ids[-1:]


def load_pretrained(name_or_dir, device=None):
    """The model and the tokenizer of one checkpoint (a local directory or a Hub repository id), checked to fit each
    other: a tokenizer with more ids than the model's vocabulary would feed it tokens past its embedding."""
    model, tokenizer = T5.from_pretrained(name_or_dir, device=device), Tokenizer.from_pretrained(name_or_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise LoadError(f"{name_or_dir}: the tokenizer has {tokenizer.vocab_size} ids (spiece.model's "
                        f"{tokenizer.spm_size} + 100 sentinels), the model's vocab_size is only "
                        f"{model.config.vocab_size}")
    return model, tokenizer
