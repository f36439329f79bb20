"""Text generation from any fmjax decoder with a preallocated KV cache.

A prefill runs the prompts through the decoder once (one jit), writing every
layer's keys and values into a cache of static shape, and samples the first
new token. The decode loop then runs inside one jit (`lax.while_loop`): each
step feeds the last token, writes its keys/values in place and samples the
next one, until `stop_at` steps or until every row has produced EOS.
Streaming calls the same loop a few steps at a time and decodes text between
calls; stop strings are matched on the host, as lm-evaluation-harness does.

Batches are left-padded: a row's prompt ends at the last prompt slot, so every
row writes its new tokens at the same cache slot, and each row's positions
count its own tokens from 0 (`positions` below), so a padded row computes what
it would alone. The cache layout, per row:

    [T' prefix slots][T soft prompt tokens][P prompt slots, left-padded][N new]

with P the prompt length rounded up to a power of two (>= 16) and N
`max_new_tokens` rounded up to a multiple of 32, so new prompt lengths reuse a
compiled prefill and decode loop (where the cache is a large share of what a
step reads, N starts at 32 and doubles: `cache_growth`). Prefix-tuning slots
are written into the cache when it is made. The attention mask is built here,
outside the model: a query sees the cache slots up to its own that hold
something (not left padding).

Sampling (`fmjax.inference.sampling`) follows HF `generate`. Each row draws
from its own key (the seed folded with the row's index in the request and the
step), so a row's sample does not depend on the other rows in its batch.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.errors import RequestError
from fmjax.inference import cache_growth
from fmjax.inference.sampling import Sampling, sample
from fmjax.inference.stops import stop_prefix_length, truncate
from fmjax.models import dense
from fmjax.models.attention import model_cache
from fmjax.models.registry import param_axes
from fmjax.models.text import decoding_head

Array = jax.Array
DecodingWeights = tuple[dict, Array | dense.ColumnParts | dense.PackedKernel | None]

MIN_PROMPT_BUCKET = 16
NEW_TOKENS_MULTIPLE = 32
# Decode steps per jitted call when streaming (text appears this often).
STREAM_CHUNK = 4
# Decode steps per jitted call otherwise: stop strings end a batch early only
# between calls.
GENERATE_CHUNK = 64


def bucket(length: int, minimum: int = MIN_PROMPT_BUCKET) -> int:
    """The compiled prompt width for `length` tokens: a power of two."""
    return max(minimum, 1 << max(0, length - 1).bit_length())


class DecodeState(NamedTuple):
    """What the decode loop carries (all arrays: it passes between jitted calls)."""

    cache: list[dict[str, Array]]
    valid_BS: Array  # cache slots that hold a token (False: left padding)
    token_B: Array  # the last sampled token, fed next
    position_B: Array  # its position
    tokens_BN: Array  # the new tokens so far (pad after EOS)
    step: Array  # how many new tokens each row has
    done_B: Array  # row emitted EOS (or is batch padding)
    keys_B: Array  # each row's sampling key


def _step_keys(keys_B: Array, step: Array) -> Array:
    return jax.vmap(lambda key: jax.random.fold_in(key, step))(keys_B)


def _mask(valid_BS: Array, last_slot_L: Array) -> Array:
    """[B,1,L,S]: query i (at cache slot last_slot_L[i]) sees the filled cache
    slots up to its own (prefix slots, soft tokens, its prompt, new tokens)."""
    slots_S = jnp.arange(valid_BS.shape[1])
    causal_LS = slots_S[None, :] <= last_slot_L[:, None]
    return valid_BS[:, None, None, :] & causal_LS[None, None]


def _model_inputs(kwargs: dict, prefill: bool) -> dict:
    """The adapter inputs the model reads: soft tokens at the prefill only; the
    prefix slots are in the cache (`init_cache`), so never `prefix_kv`."""
    return {k: v for k, v in kwargs.items() if k == "prompt_TD" and prefill}


def _num_prefix(kwargs: dict) -> int:
    prefix_kv = kwargs.get("prefix_kv")
    return 0 if prefix_kv is None else prefix_kv[0].shape[1]


def _num_prompt(kwargs: dict) -> int:
    prompt_TD = kwargs.get("prompt_TD")
    return 0 if prompt_TD is None else prompt_TD.shape[0]


def prefill(
    module,
    params,
    kwargs: dict,
    tokens_BP: Array,
    lengths_B: Array,
    keys_B: Array,
    done_B: Array,
    *,
    new_slots: int,
    sampling: Sampling,
    eos_id: int,
    pad_id: int,
    new_tokens: int | None = None,
) -> tuple[DecodeState, Array]:
    """Runs left-padded prompts (`lengths_B` real tokens each) through the
    decoder into a fresh cache with `new_slots` slots for new tokens, and samples
    the first new token (`new_tokens`: how many the state records, default
    `new_slots`). Returns the state and the prompt's last logits [B,V]."""
    cfg = module.config
    batch, width = tokens_BP.shape
    num_prefix, num_prompt = _num_prefix(kwargs), _num_prompt(kwargs)
    slots = num_prefix + num_prompt + width + new_slots
    cache = model_cache(cfg, batch, slots, kwargs.get("prefix_kv"))
    pads_B1 = (width - lengths_B)[:, None]
    columns_P = jnp.arange(width)[None, :]
    positions_BP = jnp.maximum(columns_P - pads_B1, 0).astype(jnp.int32)
    valid_BP = columns_P >= pads_B1
    valid_BS = jnp.concatenate(
        [
            jnp.ones((batch, num_prefix + num_prompt), bool),
            valid_BP,
            jnp.ones((batch, new_slots), bool),
        ],
        axis=1,
    )
    mask = _mask(valid_BS, num_prefix + jnp.arange(num_prompt + width))
    out = module.apply(
        {"params": params},
        tokens_BP,
        positions_BL=positions_BP,
        cache=cache,
        mask_B1LS=mask,
        last_only=True,
        **_model_inputs(kwargs, prefill=True),
    )
    logits_BV = out["logits"][:, -1]
    step = jnp.zeros((), jnp.int32)
    pads_BN = jnp.full((batch, new_tokens or new_slots), pad_id, jnp.int32)
    token_B = sample(logits_BV, _step_keys(keys_B, step), sampling)
    state = DecodeState(
        cache=out["cache"],
        valid_BS=valid_BS,
        token_B=token_B,
        position_B=lengths_B.astype(jnp.int32),
        tokens_BN=_record(pads_BN, token_B, done_B, 0, pad_id),
        step=step + 1,
        done_B=done_B | (token_B == eos_id),
        keys_B=keys_B,
    )
    return state, logits_BV


def _record(tokens_BN, token_B, done_B, step, pad_id):
    column_B1 = jnp.where(done_B, pad_id, token_B)[:, None]
    return jax.lax.dynamic_update_slice_in_dim(tokens_BN, column_B1, step, axis=1)


def decode_step(
    module, params, kwargs: dict, state: DecodeState, head_DV: Array | None = None
) -> tuple[Array, list[dict[str, Array]]]:
    """Feeds each row's last token; returns its logits [B,V] and the cache.
    `head_DV` (`text.decoding_head`), if given, makes the logits from the
    final hidden states (the model's own head is then dead code)."""
    slot = state.cache[0]["end_index"]
    mask = _mask(state.valid_BS, slot[None])
    out = module.apply(
        {"params": params},
        state.token_B[:, None],
        positions_BL=state.position_B[:, None],
        cache=state.cache,
        mask_B1LS=mask,
        **_model_inputs(kwargs, prefill=False),
    )
    if head_DV is None:
        return out["logits"][:, 0], out["cache"]
    return _head_logits(out["hidden"][:, 0], head_DV), out["cache"]


def _head_logits(hidden_BD: Array, head_DV: Array | dense.ColumnParts) -> Array:
    def logits(equation, h, h_DV):
        return jnp.einsum(
            equation, h.astype(h_DV.dtype), h_DV, preferred_element_type=jnp.float32
        )

    return dense.product_by_parts(logits, "BD,DV->BV", hidden_BD, head_DV)


def decode(
    module,
    params,
    kwargs: dict,
    state: DecodeState,
    stop_at: Array,
    head_DV: Array | None = None,
    *,
    sampling: Sampling,
    eos_id: int,
    pad_id: int,
) -> DecodeState:
    """Decodes until `stop_at` new tokens or every row is done, in one loop
    (`head_DV`: see `decode_step`)."""

    def running(state):
        return (state.step < stop_at) & ~jnp.all(state.done_B)

    def one_token(state):
        logits_BV, cache = decode_step(module, params, kwargs, state, head_DV)
        token_B = sample(logits_BV, _step_keys(state.keys_B, state.step), sampling)
        return state._replace(
            cache=cache,
            token_B=token_B,
            position_B=state.position_B + 1,
            tokens_BN=_record(
                state.tokens_BN, token_B, state.done_B, state.step, pad_id
            ),
            step=state.step + 1,
            done_B=state.done_B | (token_B == eos_id),
        )

    return jax.lax.while_loop(running, one_token, state)


class Generator:
    """Generation from one decoder's params: prompts in token ids or text.

    `kwargs`: the adapter's model inputs (`prompt_TD` or `prefix_kv`), as
    `Adaptation.merged` returns them. `max_len` bounds positions for learned
    position embeddings (None with RoPE, which has no table).
    """

    def __init__(
        self,
        module,
        params,
        tokenizer,
        kwargs: dict | None = None,
        max_len: int | None = None,
    ):
        cfg = module.config
        if cfg.kind != "decoder":
            raise RequestError(
                f"generation needs a decoder; this model is kind={cfg.kind!r}"
            )
        self.module, self.params, self.tokenizer = module, params, tokenizer
        self.kwargs, self.max_len = dict(kwargs or {}), max_len
        self.pad_id, self.eos_id = tokenizer.pad_id, tokenizer.eos_id
        self._parts: dict[dense.PartCounts | dense.Packed, DecodingWeights] = {}
        self._param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
        self._float32 = cfg.compute_dtype == jnp.float32  # may use Packed kernels

    @functools.cached_property
    def _prefill(self):
        return jax.jit(
            functools.partial(prefill, self.module),
            static_argnames=("new_slots", "sampling", "eos_id", "pad_id", "new_tokens"),
        )

    @functools.cached_property
    def _decode(self):
        statics = ("sampling", "eos_id", "pad_id")
        decode_ = functools.partial(decode, self.module)
        return jax.jit(decode_, static_argnames=statics, donate_argnames="state")

    @functools.cached_property
    def _head_DV(self) -> Array | None:
        """`text.decoding_head`, made once, where it pays: on XLA:CPU."""
        if jax.default_backend() != "cpu":
            return None
        head = functools.partial(decoding_head, self.module.config)
        return jax.jit(head)(self.params)

    def _decoding_weights(self, rows: int) -> DecodingWeights:
        """The params and `_head_DV`, on XLA:CPU with each kernel in
        `dense.decoding_parts` layout (`Packed`, `ColumnParts`): a kept copy."""
        parts = None
        if jax.default_backend() == "cpu":
            parts = dense.decoding_parts(rows, self._param_bytes, self._float32)
        if parts is None:
            return self.params, self._head_DV
        if parts not in self._parts:
            head, axes = self._head_DV, param_axes(self.module.config)
            head = None if head is None else parts.layout(head)
            self._parts[parts] = dense.split_kernels(self.params, parts, axes), head
        return self._parts[parts]

    # --- token ids ------------------------------------------------------------------

    def encode_prompt(self, text: str) -> list[int]:
        """[bos] + tokens: how training documents begin."""
        return [self.tokenizer.bos_id, *self.tokenizer.encode(text)]

    def _check(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
            raise RequestError(f"max_new_tokens={max_new_tokens!r}: expected int >= 1")
        for i, ids in enumerate(prompts):
            if len(ids) == 0:
                raise RequestError(f"prompt {i} has no tokens; expected at least one")
            if self.max_len is not None and len(ids) + max_new_tokens > self.max_len:
                raise RequestError(
                    f"prompt {i} has {len(ids)} tokens; with max_new_tokens="
                    f"{max_new_tokens} that passes the model's max_len="
                    f"{self.max_len} (learned positions)"
                )

    def stream_ids(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 32,
        sampling: Sampling = Sampling(),
        seed: int = 0,
        chunk: int = STREAM_CHUNK,
        row_ids: Sequence[int] | None = None,
    ) -> Iterator[np.ndarray]:
        """Yields the new tokens [B, n] so far (pad after EOS) every `chunk`
        steps and where the cache grows, up to `max_new_tokens`; stops early
        once every row has produced EOS, or when the caller stops iterating.
        `row_ids`: the key each row samples with (default 0..B-1)."""
        self._check(prompts, max_new_tokens)
        batch = len(prompts)
        rows = bucket(batch, 1)  # batch sizes in powers of two: fewer compiles
        width = bucket(max(len(p) for p in prompts))
        tokens = np.full((rows, width), self.pad_id, np.int32)
        lengths = np.ones(rows, np.int32)
        for i, ids in enumerate(prompts):
            tokens[i, width - len(ids) :] = ids
            lengths[i] = len(ids)
        tokens[batch:, -1] = self.tokenizer.bos_id
        done = np.arange(rows) >= batch
        row_ids = np.arange(batch) if row_ids is None else np.asarray(row_ids)
        key = jax.random.key(seed)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(
            np.concatenate([row_ids, np.arange(batch, rows)]).astype(np.int32)
        )
        new_slots = -(-max_new_tokens // NEW_TOKENS_MULTIPLE) * NEW_TOKENS_MULTIPLE
        room, *later = cache_growth.capacities(
            self.module.config, rows, width, new_slots, self._param_bytes
        )
        statics = dict(sampling=sampling, eos_id=self.eos_id, pad_id=self.pad_id)
        state, _ = self._prefill(
            self.params,
            self.kwargs,
            tokens,
            lengths,
            keys,
            done,
            new_slots=room,
            new_tokens=new_slots,
            **statics,
        )
        params, head_DV = self._decoding_weights(rows)
        step = 1
        while True:
            yield np.asarray(state.tokens_BN[:batch, :step])
            if step >= max_new_tokens or bool(np.all(state.done_B)):
                return
            if step > room:  # the next token's keys need a slot past the cache
                state = cache_growth.grow(state, later[0] - room)
                room, *later = later
            stop_at = min(step + chunk, max_new_tokens, room + 1)
            state = self._decode(
                params, self.kwargs, state, np.int32(stop_at), head_DV, **statics
            )
            step = int(state.step)

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 32,
        sampling: Sampling = Sampling(),
        seed: int = 0,
        batch_size: int = 8,
    ) -> list[list[int]]:
        """The new tokens of each prompt, up to and without EOS."""
        out: list[list[int]] = []
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            row_ids = range(start, start + len(batch))
            *_, tokens_BN = self.stream_ids(
                batch, max_new_tokens, sampling, seed, max_new_tokens, row_ids
            )
            out.extend(self._until_eos(row) for row in tokens_BN)
        return out

    def _text(self, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
        """The text of `new_ids` as it continues the prompt: decoded together
        with the prompt, which is then cut off, so a word-initial space that a
        tokenizer drops at the start of a text is kept."""
        decode = self.tokenizer.decode
        prompt = list(prompt_ids[1:])  # without bos
        before, together = decode(prompt), decode(prompt + list(new_ids))
        if together.startswith(before):
            return together[len(before) :]
        return decode(list(new_ids))

    def _until_eos(self, row: np.ndarray) -> list[int]:
        ids = row.tolist()
        return ids[: ids.index(self.eos_id)] if self.eos_id in ids else ids

    # --- text -------------------------------------------------------------------

    def stream(
        self,
        prompt: str,
        max_new_tokens: int = 32,
        sampling: Sampling = Sampling(),
        seed: int = 0,
        stop: Sequence[str] = (),
        chunk: int = STREAM_CHUNK,
    ) -> Iterator[str]:
        """Yields the continuation of `prompt` piece by piece as it is decoded,
        ending before EOS or the first stop string."""
        if isinstance(prompt, (list, tuple)):
            raise RequestError("stream takes one prompt string; use generate for many")
        shown = ""
        ids = [self.encode_prompt(prompt)]
        for tokens_BN in self.stream_ids(ids, max_new_tokens, sampling, seed, chunk):
            text = self._text(ids[0], self._until_eos(tokens_BN[0]))
            cut = truncate(text, stop)
            final = cut != text
            if not final:
                if cut.endswith("\ufffd"):
                    cut = cut[:-1]  # an incomplete UTF-8 character: wait for it
                cut = cut[: len(cut) - stop_prefix_length(cut, stop)]
            if len(cut) > len(shown) and cut.startswith(shown):
                yield cut[len(shown) :]
                shown = cut
            if final:
                return

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 32,
        sampling: Sampling = Sampling(),
        seed: int = 0,
        stop: Sequence[str] = (),
        batch_size: int = 8,
        progress: bool = False,
    ) -> list[str]:
        """The continuation of each prompt, ending before EOS or the first of the
        `stop` strings (a batch stops early once each row has one of them)."""
        if isinstance(prompts, str):
            raise RequestError("generate takes a list of prompts; got one string")
        ids = [self.encode_prompt(t) for t in prompts]
        return self.complete(
            ids, max_new_tokens, sampling, seed, stop, batch_size, progress
        )

    def complete(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 32,
        sampling: Sampling = Sampling(),
        seed: int = 0,
        stop: Sequence[str] = (),
        batch_size: int = 8,
        progress: bool = False,
    ) -> list[str]:
        """`generate` for prompts given as token ids (as `encode_prompt` makes
        them, or lm-evaluation-harness's own encoding)."""
        out: list[str] = []
        starts = range(0, len(prompts), batch_size)
        if progress:
            import tqdm

            starts = tqdm.tqdm(starts, desc="generate", unit="batch")
        for start in starts:
            ids = [list(p) for p in prompts[start : start + batch_size]]
            row_ids = range(start, start + len(ids))
            chunk = GENERATE_CHUNK if stop else max_new_tokens
            for tokens_BN in self.stream_ids(
                ids, max_new_tokens, sampling, seed, chunk, row_ids
            ):
                decoded = [
                    self._text(p, self._until_eos(r))
                    for p, r in zip(ids, tokens_BN, strict=True)
                ]
                if stop and all(truncate(t, stop) != t for t in decoded):
                    break
            out.extend(truncate(t, stop) for t in decoded)
        return out
