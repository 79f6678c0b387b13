"""Prefix sharing and packing: each pair's prompt runs through the model once, and pairs share rows.

The padded layout (`batches.collate_pairs`) runs every prompt twice, once before each response, and pads
every sequence to the batch's longest. Here a pair is one stretch of tokens `[prompt | chosen | rejected]`:

- Position ids restart the rejected response at the prompt's end (prompt 0..P-1, chosen P..P+C-1,
  rejected P..P+R-1), so each response sits where it sits in its padded row.
- The attention mask lets a chosen token see the prompt and the chosen tokens before it, a rejected token
  the prompt and the rejected tokens before it; neither response sees the other. So every hidden state
  equals the one at the same token of the padded layout (up to float rounding).
- With packing, several pairs share a row (first-fit decreasing by pair length, up to
  `max_tokens_per_row`); a pair's tokens see only its own pair's, position ids restart per pair, and
  padding is only at the end of a row.

Log-probs are then read back per response, not by shifting the row by one: the first token of *both*
responses is predicted from the last prompt position, which is followed in the row by the first chosen
token only. The batch names, for each response, the positions whose hidden states score it (the last
prompt position, then the response's own tokens), so `shared_inputs` + `padded_states` turn a shared
batch's hidden states into those of a padded batch whose prompts are cut to their last token, and the
padded path's log-prob code runs unchanged on them (logps.py).

The mask reaches a Hugging Face model as the 4D `attention_mask` that transformers 5 passes through
untouched (`masking_utils._preprocess_mask_arguments` returns any 4D tensor or BlockMask as is): a
boolean (R, 1, L, L) mask for sdpa, an additive float one for eager, a BlockMask for flex_attention
(forward only on CPU in torch 2.13: "FlexAttention does not support backward on CPU"; training with it
needs a GPU, untested here). A model that ignores such a mask (flash-attention's kernels take padding or
packed sequences, not two responses branching off one prompt) would silently compute wrong log-probs:
`shared_layout_unsupported` checks on a few tokens, and `prefix_sharing: false` is the way out.
"""

import torch
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from dpo_lightning.losses import IGNORE_INDEX
from dpo_lightning.models import base_causal_lm, evaluating

PROMPT, CHOSEN, REJECTED = 0, 1, 2  # `branch_ids` values
Response = tuple[list[int], list[int]]  # the flat positions that score a response, and its token ids


def pack_pairs(lengths: list[int], max_tokens_per_row: int | None = None) -> list[list[int]]:
    """Group pair indices into rows, first-fit decreasing: longest pair first, each into the first row it fits.

    Args:
        lengths: tokens of each pair, prompt + chosen + rejected.
        max_tokens_per_row: row budget. None: the longest pair, so no row is longer than without packing.
            A pair longer than the budget (possible: `max_length` bounds the prompt and one response, a pair
            holds both) gets a row of its own.

    Example:
        lengths [3, 5, 2, 4], budget 7 -> [[1, 2], [3, 0]]: 5 + 2 and 4 + 3.
    """
    budget = max(lengths) if max_tokens_per_row is None else max_tokens_per_row
    rows, used = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties keep batch order
        row = next((r for r, n in enumerate(used) if n + lengths[i] <= budget), None)
        if row is None:
            row = len(rows)
            rows.append([])
            used.append(0)
        rows[row].append(i)
        used[row] += lengths[i]
    return rows


def collate_shared(rows: list[dict], pad_token_id: int, packing: bool = False,
                   max_tokens_per_row: int | None = None) -> dict[str, Tensor]:
    """Tokenized pairs as `[prompt | chosen | rejected]` stretches, one pair per row or packed.

    Args:
        rows: B dicts with `prompt_input_ids` (not empty), `chosen_input_ids`, `rejected_input_ids`, optional `row_id`.
        pad_token_id: id written into the padding at the end of rows.
        packing: several pairs per row (`pack_pairs`); otherwise one pair per row, in batch order.
        max_tokens_per_row: the row budget of `pack_pairs`, when packing.

    Returns:
        For R rows of L tokens: `input_ids`, `position_ids`, `pair_ids` (the pair in the batch, -1 on
        padding), `branch_ids` (0 prompt, 1 chosen, 2 rejected, 0 on padding), each (R, L);
        `response_positions` and `labels`, each (2B, S), chosen responses then rejected: response k's
        scoring positions as indices into the flattened (R * L) row tokens, and its labels as in
        `collate_pairs` (S is the longest response + 1); `pairs_per_row` (R,); and `row_ids` (B,) when
        the rows carry a `row_id`.

    Example:
        prompt [5, 6], chosen [7, 2], rejected [8, 9, 2], pad id 0, one row:
            input_ids          = [[5, 6, 7, 2, 8, 9, 2]]
            position_ids       = [[0, 1, 2, 3, 2, 3, 4]]
            pair_ids           = [[0, 0, 0, 0, 0, 0, 0]]
            branch_ids         = [[0, 0, 1, 1, 2, 2, 2]]
            response_positions = [[1, 2, 3, 0], [1, 4, 5, 6]]  # the last prompt token (1) scores 7 and 8
            labels             = [[-100, 7, 2, -100], [-100, 8, 9, 2]]
        input_ids.flatten()[response_positions] is [[6, 7, 2, 5], [6, 8, 9, 2]]: the padded rows
        [5, 6, 7, 2, 0] and [5, 6, 8, 9, 2] cut to the prompt's last token (the 5 is a padding column).
    """
    if any(not row["prompt_input_ids"] for row in rows):
        raise ValueError("prefix sharing needs a non-empty prompt in every pair (its last token predicts both "
                         "responses' first tokens): set --data.prefix_sharing false for this data")
    lengths = [len(row["prompt_input_ids"]) + len(row["chosen_input_ids"]) + len(row["rejected_input_ids"])
               for row in rows]
    groups = pack_pairs(lengths, max_tokens_per_row) if packing else [[i] for i in range(len(rows))]
    width = max(sum(lengths[i] for i in group) for group in groups)
    batch = {"input_ids": torch.full((len(groups), width), pad_token_id, dtype=torch.long),
             "position_ids": torch.zeros((len(groups), width), dtype=torch.long),
             "pair_ids": torch.full((len(groups), width), -1, dtype=torch.long),
             "branch_ids": torch.full((len(groups), width), PROMPT, dtype=torch.long)}
    responses: list[Response] = [None] * (2 * len(rows))  # chosen k = i, rejected k = B + i
    for r, group in enumerate(groups):
        column = 0
        for i in group:
            responses[i], responses[len(rows) + i] = _place_pair(batch, rows[i], i, r, column)
            column += lengths[i]
    batch["response_positions"], batch["labels"] = _response_grid(responses)
    batch["pairs_per_row"] = torch.tensor([len(group) for group in groups])
    if rows and "row_id" in rows[0]:
        batch["row_ids"] = torch.tensor([row["row_id"] for row in rows])
    return batch


def _place_pair(batch: dict[str, Tensor], row: dict, pair: int, r: int, column: int) -> tuple[Response, Response]:
    """Write one pair into row r from `column`; return its chosen and rejected responses."""
    prompt, chosen, rejected = row["prompt_input_ids"], row["chosen_input_ids"], row["rejected_input_ids"]
    p, c, n = len(prompt), len(chosen), len(rejected)
    span = slice(column, column + p + c + n)
    batch["input_ids"][r, span] = torch.tensor(prompt + chosen + rejected)
    batch["position_ids"][r, span] = torch.tensor([*range(p + c), *range(p, p + n)])
    batch["pair_ids"][r, span] = pair
    batch["branch_ids"][r, span] = torch.tensor([PROMPT] * p + [CHOSEN] * c + [REJECTED] * n)
    start = r * batch["input_ids"].shape[1] + column  # flat index of the pair's first token
    last_prompt, first_rejected = start + p - 1, start + p + c
    # Both responses' first tokens are predicted from the last prompt position, as in their padded rows.
    return (([last_prompt, *range(last_prompt + 1, first_rejected)], chosen),
            ([last_prompt, *range(first_rejected, first_rejected + n)], rejected))


def _response_grid(responses: list[Response]) -> tuple[Tensor, Tensor]:
    """(2B, S) scoring positions (0 in padding columns) and labels (IGNORE_INDEX first and in padding)."""
    width = max(len(tokens) for _, tokens in responses) + 1
    positions = torch.zeros((len(responses), width), dtype=torch.long)
    labels = torch.full((len(responses), width), IGNORE_INDEX, dtype=torch.long)
    for k, (scoring, tokens) in enumerate(responses):
        positions[k, : len(scoring)] = torch.tensor(scoring)
        labels[k, 1 : 1 + len(tokens)] = torch.tensor(tokens)
    return positions, labels


def is_shared(batch: dict[str, Tensor]) -> bool:
    """Whether `batch` comes from `collate_shared` rather than `batches.collate_pairs`."""
    return "response_positions" in batch


def visible(pair_ids: Tensor, branch_ids: Tensor, b: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """Whether token q of row b attends to token k: earlier (or itself), same pair, and a prompt or same-branch token.

    Written on index tensors so the same rule builds a dense mask (broadcast indices) and a FlexAttention
    `mask_mod`. Padding (pair -1, branch 0) sees the padding before it, so no query's row is all masked.
    """
    key_branch = branch_ids[b, k]
    return ((k <= q) & (pair_ids[b, q] == pair_ids[b, k])
            & ((key_branch == PROMPT) | (key_branch == branch_ids[b, q])))


def attention_mask(lm: nn.Module, batch: dict[str, Tensor]) -> Tensor | BlockMask:
    """The shared layout's mask in the form `lm`'s attention implementation takes a custom 4D mask.

    sdpa (and the default): boolean (R, 1, L, L), True = attend. eager adds its mask to the scores: 0 or
    the dtype's minimum, as transformers' own `eager_mask`. flex_attention: a BlockMask of the same rule.
    """
    pair_ids, branch_ids = batch["pair_ids"], batch["branch_ids"]
    n_rows, length = pair_ids.shape
    implementation = lm.config._attn_implementation
    if implementation == "flex_attention":
        def mask_mod(b, h, q, k):
            return visible(pair_ids, branch_ids, b, q, k)

        return create_block_mask(mask_mod, n_rows, None, length, length, device=pair_ids.device)
    index = torch.arange(length, device=pair_ids.device)
    rows = torch.arange(n_rows, device=pair_ids.device)[:, None, None]
    mask = visible(pair_ids, branch_ids, rows, index[None, :, None], index[None, None, :])[:, None]  # (R, 1, L, L)
    if implementation == "eager":
        return torch.zeros(mask.shape, dtype=lm.dtype, device=mask.device).masked_fill(~mask, torch.finfo(lm.dtype).min)
    return mask


def shared_inputs(lm: nn.Module, batch: dict[str, Tensor]) -> dict:
    """The model's keyword arguments for a shared batch: its ids, position ids and 4D mask."""
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
            "attention_mask": attention_mask(lm, batch)}


def padded_states(states: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """A shared batch's per-position outputs (hidden states or logits) in the padded layout of `batch["labels"]`.

    The (R, L, ...) outputs are gathered at `response_positions` into (2B, S, ...), where, as in the padded
    layout, column t scores label t + 1. An output that scores two tokens (the last prompt position) is
    gathered twice, and its gradient summed.
    """
    return states.flatten(0, 1)[batch["response_positions"]]


def rounding_tolerance(dtype: torch.dtype) -> float:
    """How far, relative to the largest value, two computations of the same outputs in `dtype` may differ.

    1e-3 in float32; in bf16 (2^-8 relative rounding, 8 bits of mantissa) and fp16, 4 units of rounding,
    since CPU kernel sets (AVX-512, AVX2, the `default` one) and GPU kernels round each matmul differently
    (measured: up to 1.5 units on a 2-layer model under ATEN_CPU_CAPABILITY=avx2).
    """
    return max(1e-3, 2 * torch.finfo(dtype).eps)


def shared_layout_unsupported(model: nn.Module) -> str | None:
    """Why the shared layout would not reproduce the padded layout's outputs on `model`, or None when it does.

    Packs two pairs of a few tokens into one row and compares the decoder's hidden states at each response's
    scoring positions with those of the response run alone, unpadded, within `rounding_tolerance` of the
    model's dtype (as `logps.lean_unsupported`). A mask the model ignores lets a rejected token see the
    chosen response or the other pair: that moves the hidden states by half their largest value or more,
    even in a randomly initialised model, so it is caught in any dtype. Ignored position ids shift the
    rejected response, which moves a random Llama's states by under 1% (its attention is nearly uniform):
    caught in float32, below bf16's tolerance.
    """
    lm = base_causal_lm(model)
    vocab = lm.config.get_text_config().vocab_size
    device = next(lm.parameters()).device

    def tokens(start: int, n: int) -> list[int]:
        return [(start + 7 * i) % vocab for i in range(n)]

    rows = [{"prompt_input_ids": tokens(3, 3), "chosen_input_ids": tokens(11, 2), "rejected_input_ids": tokens(5, 4)},
            {"prompt_input_ids": tokens(17, 2), "chosen_input_ids": tokens(2, 3), "rejected_input_ids": tokens(9, 1)}]
    batch = {k: v.to(device) for k, v in collate_shared(rows, 0, packing=True).items()}
    try:
        with evaluating(lm), torch.no_grad():  # no dropout, so the two runs are comparable
            shared = padded_states(lm.base_model(**shared_inputs(lm, batch), use_cache=False).last_hidden_state,
                                   batch)  # (4, S, D)
            alone = [_alone_states(lm, row["prompt_input_ids"], row[side], device)
                     for side in ("chosen_input_ids", "rejected_input_ids") for row in rows]
    except Exception as error:  # an attention implementation that rejects a 4D mask or position ids
        return f"{type(lm).__name__} cannot take the shared layout's 4D attention mask ({error!r})"
    tolerance = rounding_tolerance(lm.dtype)
    for k, expected in enumerate(alone):
        actual = shared[k, : len(expected)].float()
        if not torch.allclose(actual, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item()):
            return (f"{type(lm).__name__} with attn_implementation={lm.config._attn_implementation!r} ignores "
                    "the shared layout's attention mask or position ids (its hidden states differ from the "
                    "padded layout's)")
    return None


def _alone_states(lm: nn.Module, prompt: list[int], response: list[int], device: torch.device) -> Tensor:
    """The decoder's float hidden states (1 + len(response), D) at `response`'s scoring positions, run alone."""
    input_ids = torch.tensor([prompt + response], device=device)
    return lm.base_model(input_ids=input_ids, use_cache=False).last_hidden_state[0, len(prompt) - 1 :].float()
