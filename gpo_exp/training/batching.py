"""Right-padded batches of (prompt + completion) token sequences and their per-token log-probs.

Log-prob code uses right padding: a plain forward pass (unlike `generate`) does not fix positions
for left padding. `loss_mask` marks the completion tokens a loss should count.

Memory: log-probs never materialise the (B, T, V) logits. The decoder's last hidden state is read
at the positions that predict a counted token only, and the output head runs on those rows in chunks
of `LOGPROB_CHUNK_BYTES` of fp32 logits (gather minus logsumexp, "selective log-softmax" as in TRL).
The backward pass recomputes one block at a time instead of keeping all of them, so memory beyond
the activations is about one such block, independent of B * T and of the vocabulary.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:  # type only: config validation imports this module before transformers
    from transformers import PreTrainedModel

LOGPROB_CHUNK_BYTES = 128 * 2**20  # one fp32 (rows, V) block of logits: 220 rows at Qwen2's 151,936 vocabulary
SCORE_MAX_TOKENS = 32_768  # padded tokens per no-grad scoring batch (reference precompute, old-policy pass)


def pad_sequences(seqs: Sequence[Sequence[int]], starts: Sequence[int], pad_id: int,
                  ends: Sequence[int | None] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad `seqs`; loss_mask is 1 on tokens starts[i] <= index < ends[i] (default: to the end)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    loss = torch.zeros((len(seqs), T), dtype=torch.float32)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        attn[i, : len(s)] = 1
        end = len(s) if ends is None or ends[i] is None else min(ends[i], len(s))
        loss[i, st: end] = 1.0
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def _causal_lm(model: nn.Module) -> nn.Module:
    """The HF causal LM inside a peft wrapper (its LoRA layers stay in place), or `model` itself."""
    from gpo_exp.models.lora import is_lora

    return model.get_base_model() if is_lora(model) else model


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden state (B, T, H), after its final norm, without computing any logits."""
    from gpo_exp.models.lora import AdapterOffReference

    if isinstance(model, AdapterOffReference):
        with model.adapters_off():
            return final_hidden(model.policy, input_ids, attention_mask)
    decoder = _causal_lm(model).get_decoder()
    return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def output_head(model: nn.Module) -> tuple[nn.Module, float | None]:
    """(the LM head, its final logit soft-cap or None): what turns a hidden state into logits."""
    from gpo_exp.models.lora import AdapterOffReference

    lm = _causal_lm(model.policy if isinstance(model, AdapterOffReference) else model)
    return lm.get_output_embeddings(), getattr(lm.config, "final_logit_softcapping", None)


def _chunk_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


class _LinearSelectiveLogps(torch.autograd.Function):
    """log_softmax(hidden @ W^T)[targets] by chunks of rows, with a hand-written backward.

    Forward keeps only the (N,) results and log-normalisers (logsumexp computed in place); backward
    recomputes each chunk's logits once and turns them in place into d lp / d logits =
    onehot(target) - softmax, so about one fp32 (chunk, V) block exists at a time (autograd through
    `_chunk_logps` would hold four or more).
    Matmuls run in `dtype` (the autocast dtype under mixed precision), softmax statistics in fp32.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                dtype: torch.dtype) -> torch.Tensor:
        w = weight.to(dtype)
        out, lses = [], []
        for i in range(0, hidden.shape[0], chunk):
            z = torch.nn.functional.linear(hidden[i: i + chunk].to(dtype), w).float()
            target = z.gather(-1, targets[i: i + chunk, None]).squeeze(-1)
            top = z.amax(-1, keepdim=True)
            lse = z.sub_(top).exp_().sum(-1).log_() + top.squeeze(-1)  # logsumexp, in place: one block
            out.append(target - lse)
            lses.append(lse)
        ctx.save_for_backward(hidden, weight, targets, torch.cat(lses) if lses else hidden.new_zeros(0))
        ctx.chunk, ctx.dtype = chunk, dtype
        return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gh = torch.zeros_like(hidden) if need_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        w = weight.to(ctx.dtype)
        for i in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[i: i + ctx.chunk].to(ctx.dtype)
            z = torch.nn.functional.linear(h, w).float()
            z.sub_(lse[i: i + ctx.chunk, None]).exp_().neg_()  # -softmax, in place
            z[torch.arange(z.shape[0], device=z.device), targets[i: i + ctx.chunk]] += 1.0
            gz = z.mul_(grad_out[i: i + ctx.chunk, None].float()).to(ctx.dtype)
            del z
            if need_h:
                gh[i: i + ctx.chunk] = (gz @ w).to(gh.dtype)
            if need_w:
                gw += (gz.t() @ h).float()
        return gh, (gw.to(weight.dtype) if need_w else None), None, None, None


def selective_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None = None,
                    chunk: int | None = None) -> torch.Tensor:
    """log softmax(head(hidden))[targets] for rows of `hidden` (N, H), `chunk` rows at a time
    (default: as many as fit in LOGPROB_CHUNK_BYTES of fp32 logits)."""
    weight = head.weight
    chunk = chunk or max(16, LOGPROB_CHUNK_BYTES // (4 * weight.shape[0]))
    device = hidden.device.type
    if type(head) is nn.Linear and head.bias is None and not softcap:  # the usual LM head: the fused path
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        with torch.autocast(device, enabled=False):
            return _LinearSelectiveLogps.apply(hidden, weight, targets, chunk, dtype)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    parts = []
    for i in range(0, hidden.shape[0], chunk):  # any other head: autograd, one checkpointed chunk at a time
        h, t = hidden[i: i + chunk], targets[i: i + chunk]
        parts.append(checkpoint(_chunk_logps, head, h, t, softcap, use_reentrant=False) if grad
                     else _chunk_logps(head, h, t, softcap))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def token_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                positions: torch.Tensor | None = None, value_head: nn.Module | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log p(token_t | tokens_<t), (B, T) fp32, at `positions` (default: every attended
    token t >= 1) and 0 elsewhere; with a value head also its value of the state before each such token.
    """
    pos = (attention_mask if positions is None else positions).bool().clone()
    pos[:, 0] = False  # token 0 has no prediction
    b, t = pos.nonzero(as_tuple=True)
    head, softcap = output_head(model)
    hidden = final_hidden(model, input_ids, attention_mask)
    h = hidden[b, t - 1]  # the state that predicts token t
    lp = selective_logps(head, h, input_ids[b, t], softcap)
    logps = torch.zeros(pos.shape, dtype=lp.dtype, device=lp.device).index_put((b, t), lp)
    values = None
    if value_head is not None:
        v = value_head(h.to(next(value_head.parameters()).dtype)).squeeze(-1).float()
        values = torch.zeros(pos.shape, dtype=v.dtype, device=v.device).index_put((b, t), v)
    return logps, values


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each sequence's masked tokens, and the number of those tokens."""
    mask = batch["loss_mask"]
    logps, _ = token_logps(model, batch["input_ids"], batch["attention_mask"], positions=mask)
    return (logps * mask.to(logps)).sum(-1), mask.sum(-1)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model runs: HF models and the LoRA reference say so; otherwise its first parameter's device."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int = SCORE_MAX_TOKENS) -> list[list[int]]:
    """Consecutive index batches of at most `batch_size` rows and `max_tokens` padded tokens (one row
    always fits). Sort by length first for dense batches."""
    out: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if cur and (len(cur) >= batch_size or max(longest, n) * (len(cur) + 1) > max_tokens):
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    return out + [cur] if cur else out


@torch.inference_mode()
def score_sequences(model: torch.nn.Module, seqs: Sequence[Sequence[int]], starts: Sequence[int], pad_id: int,
                    batch_size: int = 32, ends: Sequence[int | None] | None = None,
                    max_tokens: int = SCORE_MAX_TOKENS) -> list[float]:
    """Summed log-prob of each sequence's tokens from `starts[i]` on (to `ends[i]` if given), for a
    frozen model (no gradient).

    Built for the one-off reference pass over a round's data: identical (sequence, start, end) are
    scored once (a chosen continuation shared by several pairs, say), and sequences are sorted by
    length and batched under a padded-token budget, so memory stays bounded and little compute goes
    to padding. Without gradients a forward keeps no activations, so callers pass twice the sequences
    of a training step: fewer, fuller batches.
    """
    ends = ends if ends is not None else [None] * len(seqs)
    keys = [(tuple(s), st, en) for s, st, en in zip(seqs, starts, ends)]
    uniq = sorted(set(keys), key=lambda k: len(k[0]))
    device = model_device(model)
    scores: dict[tuple[tuple[int, ...], int, int | None], float] = {}
    for idx in length_batches([len(k[0]) for k in uniq], batch_size, max_tokens):
        chunk = [uniq[i] for i in idx]
        batch = pad_sequences([k[0] for k in chunk], [k[1] for k in chunk], pad_id, [k[2] for k in chunk])
        logps, _ = sequence_logps(model, {k: v.to(device) for k, v in batch.items()})
        scores.update(zip(chunk, logps.tolist()))
    return [scores[k] for k in keys]


def logprob_tolerance(logits: torch.Tensor, *dtypes: torch.dtype) -> float:
    """How far two correct log-prob computations may differ when their logits come from different
    matmul shapes in `dtypes` (the model's logits' and the head's; the lowest precision counts).

    Each path rounds every logit z to its dtype, an error of at most half a unit in the last place,
    eps * |z| / 2 (eps: the dtype's machine epsilon, 2**-7 for bfloat16), so the two paths' logits
    differ by at most eps * |z|; a log-prob z_t - logsumexp(z) then by at most 2 * eps * max|z|.
    Twice that bound (for the fp32 accumulation orders, which may differ before rounding), plus the
    1e-3 an fp32 model is held to. bfloat16 logits around 20 give 0.63: the check still catches a
    missing logit scale or soft-cap, which moves log-probs by whole nats."""
    eps = max(torch.finfo(d).eps for d in (logits.dtype, *dtypes) if d.is_floating_point)
    return 1e-3 + 4 * eps * float(logits.detach().abs().max())


@torch.no_grad()
def check_logprob_path(model: nn.Module, length: int = 16) -> float:
    """Raise if `token_logps` (decoder + head on selected rows) disagrees with the model's own
    logits on a short random sequence: an architecture whose logits are not head(last hidden state)
    (an extra scale, say) would otherwise train on wrong log-probs. The tolerance follows the
    precision of the logits (`logprob_tolerance`): 1e-3 in fp32, more in bf16, where the two matmul
    shapes round logits differently. Returns the largest difference."""
    from gpo_exp.registry import ConfigError

    device = model_device(model)
    head = _causal_lm(model).get_output_embeddings()
    vocab = head.weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, length), generator=gen).to(device)
    mask = torch.ones_like(ids)
    was = model.training
    model.eval()
    try:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        full = torch.log_softmax(logits.float(), -1)
        want = full.gather(-1, ids[:, 1:, None]).squeeze(-1)
        got = token_logps(model, ids, mask)[0][:, 1:]
    finally:
        model.train(was)
    dtypes = [head.weight.dtype]
    if torch.is_autocast_enabled(device.type):
        dtypes.append(torch.get_autocast_dtype(device.type))
    err, tol = float((got - want).abs().max()), logprob_tolerance(logits, *dtypes)
    if not err < tol:
        raise ConfigError(f"model {type(model).__name__}: log-probs from its decoder and output head differ from its "
                          f"logits by {err:.2g} (> {tol:.2g} for {logits.dtype} logits); this architecture is not "
                          f"supported by the memory-bounded log-prob path")
    return err
