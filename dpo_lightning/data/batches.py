"""Rule 4 of rules.py for the padded layout: tokenized pairs -> padded, labelled batches.

Each pair becomes two rows, prompt + chosen and prompt + rejected; a batch holds the chosen rows first,
then the rejected rows, so one forward pass scores both. The labels are the input ids with every prompt
and padding position set to `IGNORE_INDEX`, placed by lengths, never by comparing ids, so a response's
EOS is learned even when pad == eos. packing.py's `collate_shared` builds the shared-prefix layout.
"""

import torch

# Label value of positions that carry no loss: the default `ignore_index` of F.cross_entropy and of
# Hugging Face models, so our labels can be fed to either unchanged.
IGNORE_INDEX = -100


def pad_and_label(sequences: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Rule 4 for N (prompt, response) id lists: `input_ids`, `attention_mask`, `labels`, each (N, T), right-padded,
    the labels IGNORE_INDEX over the prompt and the padding (`collate_pairs` shows an example)."""
    width = max(len(prompt) + len(response) for prompt, response in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (prompt, response) in enumerate(sequences):
        input_ids[i, : len(prompt) + len(response)] = torch.tensor(prompt + response)
        attention_mask[i, : len(prompt) + len(response)] = 1
    labels = response_labels([len(prompt) for prompt, _ in sequences], [response for _, response in sequences], width)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def response_labels(starts: list[int], responses: list[list[int]], width: int) -> torch.Tensor:
    """Rule 4's labels (N, width): response i's ids from column `starts[i]`, `IGNORE_INDEX` everywhere else (the
    prompt before it, the padding after). Placed by lengths, never by comparing ids, so a response's EOS is
    labelled even when pad == eos. Both layouts label through here (packing.py with each prompt cut to one column).
    """
    labels = torch.full((len(responses), width), IGNORE_INDEX, dtype=torch.long)
    for i, (start, response) in enumerate(zip(starts, responses)):
        labels[i, start : start + len(response)] = torch.tensor(response, dtype=torch.long)
    return labels


def collate_pairs(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad tokenized pairs into one batch: chosen rows first, then rejected rows, right-padded.

    Args:
        rows: B dicts with `prompt_input_ids`, `chosen_input_ids`, `rejected_input_ids` (lists of ids).
        pad_token_id: id written into padding; padding is masked by `attention_mask` and `labels`.

    Returns:
        `input_ids`, `attention_mask`, `labels`, each (2B, T) with T the longest sequence of the batch,
        and `row_ids` (B,), each pair's row in its split, when the rows carry a `row_id`.

    Example:
        prompt [5, 6], chosen [7, 2], rejected [8, 9, 2], pad id 0:
            input_ids      = [[5, 6, 7, 2, 0], [5, 6, 8, 9, 2]]
            attention_mask = [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
            labels         = [[-100, -100, 7, 2, -100], [-100, -100, 8, 9, 2]]
    """
    batch = pad_and_label([(row["prompt_input_ids"], row[response]) for response in ("chosen_input_ids",
                          "rejected_input_ids") for row in rows], pad_token_id)
    if rows and "row_id" in rows[0]:
        batch["row_ids"] = torch.tensor([row["row_id"] for row in rows])
    return batch
