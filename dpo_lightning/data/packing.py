"""Prefix sharing and packing: each pair's prompt runs through the model once, and pairs share rows.

The padded layout (`batches.collate_pairs`) runs every prompt twice, once before each response, and pads
every sequence to the batch's longest. Here a pair is one stretch of tokens `[prompt | chosen | rejected]`:

- Position ids restart the rejected response at the prompt's end (prompt 0..P-1, chosen P..P+C-1,
  rejected P..P+R-1), so each response sits where it sits in its padded row.
- The attention mask (layouts.py builds it from `pair_ids` and `branch_ids`) lets a chosen token see the
  prompt and the chosen tokens before it, a rejected token the prompt and the rejected tokens before it;
  neither response sees the other. So every hidden state equals the one at the same token of the padded
  layout (up to float rounding).
- With packing, several pairs share a row (first-fit decreasing by pair length, up to
  `max_tokens_per_row`); a pair's tokens see only its own pair's, position ids restart per pair, and
  padding is only at the end of a row.

Log-probs are then read back per response, not by shifting the row by one: the first token of *both*
responses is predicted from the last prompt position, which is followed in the row by the first chosen
token only. The batch names, for each response, the positions whose hidden states score it (the last
prompt position, then the response's own tokens), so `layouts.Shared` turns a shared batch's hidden states
into those of a padded batch whose prompts are cut to their last token, and the padded path's log-prob code
runs unchanged on them (training/logps.py). Its labels follow rule 4 as the padded layout's do
(`batches.response_labels`).
"""

import torch
from torch import Tensor

from dpo_lightning.data.batches import response_labels

SHARED = "shared"  # `batch["layout"]` of these batches (layouts.py)
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
        `collate_pairs` (S is the longest response + 1); `pairs_per_row` (R,); `row_ids` (B,) when
        the rows carry a `row_id`; and `layout`: "shared" (layouts.py).

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
    batch["layout"] = SHARED
    return batch


def shared_pairs(batch: dict[str, Tensor]) -> list[dict[str, list[int]]]:
    """The tokenized pairs of a shared batch, in batch order (`collate_shared`'s rows, without their `row_id`).

    Example:
        the batch of `collate_shared`'s example -> [{"prompt_input_ids": [5, 6], "chosen_input_ids": [7, 2],
        "rejected_input_ids": [8, 9, 2]}]
    """
    pairs = []
    for pair in range(len(batch["labels"]) // 2):
        where = batch["pair_ids"] == pair  # one stretch of one row, so the flattened tokens keep their order
        tokens, branches = batch["input_ids"][where].tolist(), batch["branch_ids"][where].tolist()
        pairs.append({f"{name}_input_ids": [t for t, b in zip(tokens, branches) if b == branch]
                      for name, branch in (("prompt", PROMPT), ("chosen", CHOSEN), ("rejected", REJECTED))})
    return pairs


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
    """(2B, S) scoring positions (0 in padding columns) and labels: each response's ids after its one scoring
    prompt position, as in its padded row cut to the prompt's last token."""
    width = max(len(tokens) for _, tokens in responses) + 1
    positions = torch.zeros((len(responses), width), dtype=torch.long)
    for k, (scoring, _) in enumerate(responses):
        positions[k, : len(scoring)] = torch.tensor(scoring)
    return positions, response_labels([1] * len(responses), [tokens for _, tokens in responses], width)
