"""The public preference sets, zero-config: local replicas written from their dataset cards, loaded from
nothing but their path, every kept row's ids checked against an oracle written here.

Each replica has the set's exact column names and nested types (parquet or JSON lines, as the hub stores
it) and a few rows, awkward ones included: ties, multi-turn conversations, system messages, an empty
assistant turn, chosen == rejected, tool calls as responses, thinking switched off. The tokenizer is
`conftest.ascii_tokenizer` (one token per character) with a small Zephyr-style chat template (BOS added;
`chat_ids` renders and tokenizes it by hand), or, for tool-calling and reasoning sets, with
`conftest.QWEN_TEMPLATE` (Qwen3's template cut down: tools, tool calls, <think>, `enable_thinking`;
`conftest.qwen_pair` renders it by hand); the oracles call neither Jinja nor the package. Each replica also
goes through the CLI (`dpo-lightning inspect-data`, its first row's tokens checked), and two through
`dpo-lightning fit` with a tiny Llama. The `transform` hook (a Python callable, or an import path from YAML),
the guards against rules the columns contradict (a mapping against a label, a set with two labels), data that
cannot train (unpaired KTO rows, images) and the ignored-column accounting are tested last. No network.
"""

import csv
import gzip
import json
import shutil
import textwrap
import warnings
from typing import NamedTuple

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BOS, EOS, ascii_tokenizer, ids, qwen_pair, qwen_tokenizer

from dpo_lightning.cli.main import cli_main, main
from dpo_lightning.data import PreferenceDataModule

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
MESSAGES = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))  # as the cards list them


def chat_tokenizer(template: bool = True):
    tokenizer = ascii_tokenizer(add_bos=True)
    tokenizer.chat_template = CHAT_TEMPLATE if template else None
    return tokenizer


def chat_ids(messages: list[dict], generation: bool = False) -> list[int]:
    """CHAT_TEMPLATE rendered and tokenized by hand: BOS, each message's "<|role|>\\ncontent</s>\\n", the
    generation prompt "<|assistant|>\\n"; the markers <s> and </s> are the BOS and EOS tokens."""
    out = [BOS]
    for m in messages:
        out += ids(f"<|{m['role']}|>\n{m['content']}") + [EOS] + ids("\n")
    return out + (ids("<|assistant|>\n") if generation else [])


def say(role, text):
    return {"content": text, "role": role}


def chat_pair(prompt: list[dict], chosen: str, rejected: str) -> tuple[list[int], list[int], list[int]]:
    """The oracle for a conversation: the prompt with the generation prompt, each answer as the rest of the
    whole conversation's rendering (its text, the end-of-turn </s>, the newline)."""
    head = chat_ids(prompt, generation=True)
    return head, *(chat_ids([*prompt, say("assistant", answer)])[len(head):] for answer in (chosen, rejected))


def question_pair(question: str, chosen: str, rejected: str) -> tuple[list[int], list[int], list[int]]:
    """The oracle for a set's text question and text answers: [user: question] and each answer through the chat
    template, as for orca_dpo_pairs (before, SHP, PKU-SafeRLHF and StackExchange-paired trained the raw texts glued
    together, "Why rest dough?Gluten relaxes.", while orca and truthy went through the template)."""
    return chat_pair([say("user", question)], chosen, rejected)


def text_pair(prompt: str, chosen: str, rejected: str) -> tuple[list[int], list[int], list[int]]:
    """The oracle for text fields: BOS + the prompt's characters, each response's characters + EOS."""
    return [BOS, *ids(prompt)], ids(chosen) + [EOS], ids(rejected) + [EOS]


def write_parquet(path, columns: dict, types: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=pa.schema(list(types.items()))), path)
    return path


def write_jsonl(path, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


# --- The replicas: (file, kept rows' oracle ids by row, drops by reason, the schema named in the summary,
# the data settings it needs, whether it renders with QWEN_TEMPLATE). ---

UNIQUE, IGNORED = "", "whole conversations + text prompt (text prompt ignored)"


class Replica(NamedTuple):
    path: object
    kept: dict
    dropped: dict
    schema: str
    settings: dict = {}
    qwen: bool = False


def ultrafeedback(tmp):
    """HuggingFaceH4/ultrafeedback_binarized, split train_prefs: a text prompt beside whole conversations."""
    q = [say("user", "What is 2+2?")]
    multi = [say("user", "Hi"), say("assistant", "Hello!"), say("user", "Name a color")]
    chosen = [[*q, say("assistant", "4")], [*q, say("assistant", "Same")], [*q, say("assistant", "")],
              [*multi, say("assistant", "Blue")]]
    rejected = [[*q, say("assistant", "5")], [*q, say("assistant", "Same")], [*q, say("assistant", "22")],
                [*multi, say("assistant", "Loud")]]
    path = write_parquet(tmp / "data" / "train_prefs-00000-of-00001.parquet", {
        "prompt": ["What is 2+2?"] * 3 + ["Name a color"], "prompt_id": ["a", "b", "c", "d"],
        "chosen": chosen, "rejected": rejected, "messages": chosen,
        "score_chosen": [8.0, 5.0, 1.0, 9.0], "score_rejected": [3.0, 5.0, 4.0, 2.0]},
        {"prompt": pa.string(), "prompt_id": pa.string(), "chosen": MESSAGES, "rejected": MESSAGES,
         "messages": MESSAGES, "score_chosen": pa.float64(), "score_rejected": pa.float64()})
    kept = {0: chat_pair(q, "4", "5"), 3: chat_pair(multi, "Blue", "Loud")}
    return path, kept, {"chosen == rejected": 1, "empty chosen": 1}, IGNORED


def tulu3(tmp):
    """allenai/llama-3.1-tulu-3-8b-preference-mixture: id, prompt, chosen, rejected, source; system messages."""
    system = [say("system", "Answer in one word."), say("user", "Sky color?")]
    plain = [say("user", "Capital of France?")]
    path = write_parquet(tmp / "data" / "train-00000-of-00004.parquet", {
        "id": ["x1", "x2"], "prompt": ["Sky color?", "Capital of France?"],
        "chosen": [[*system, say("assistant", "Blue")], [*plain, say("assistant", "Paris")]],
        "rejected": [[*system, say("assistant", "It is blue")], [*plain, say("assistant", "Lyon")]],
        "source": ["ai2-adapt-dev/if", "ai2-adapt-dev/ultrafeedback"]},
        {"id": pa.string(), "prompt": pa.string(), "chosen": MESSAGES, "rejected": MESSAGES, "source": pa.string()})
    return path, {0: chat_pair(system, "Blue", "It is blue"), 1: chat_pair(plain, "Paris", "Lyon")}, {}, IGNORED


def capybara(tmp):
    """argilla/distilabel-capybara-dpo-7k-binarized: multi-turn conversations, ratings and models."""
    turns = [say("user", "Plan a trip"), say("assistant", "Where to?"), say("user", "Rome")]
    other = [say("user", "Plan a trip"), say("assistant", "Sure."), say("user", "Rome")]  # leading turns differ
    path = write_parquet(tmp / "data" / "train-00000-of-00001.parquet", {
        "source": ["Airoboros", "Dove"], "prompt": ["Plan a trip", "Plan a trip"],
        "chosen": [[*turns, say("assistant", "See the Forum")], [*turns, say("assistant", "Go")]],
        "chosen_rating": [5, 4], "chosen_model": ["gpt-4", "gpt-4"],
        "rejected": [[*turns, say("assistant", "No")], [*other, say("assistant", "Stay")]],
        "rejected_rating": [1, 2], "rejected_model": ["mistral", "mistral"]},
        {"source": pa.string(), "prompt": pa.string(), "chosen": MESSAGES, "chosen_rating": pa.int64(),
         "chosen_model": pa.string(), "rejected": MESSAGES, "rejected_rating": pa.int64(),
         "rejected_model": pa.string()})
    return path, {0: chat_pair(turns, "See the Forum", "No")}, {"prompts differ": 1}, IGNORED


def orpo_mix(tmp):
    """mlabonne/orpo-dpo-mix-40k: source, chosen, rejected, prompt, question (text beside conversations)."""
    system = [say("system", "You are terse."), say("user", "2*3?")]
    path = write_parquet(tmp / "data" / "train-00000-of-00001.parquet", {
        "source": ["Intel/orca_dpo_pairs", "argilla/ultrafeedback"],
        "chosen": [[*system, say("assistant", "6")], [say("user", "Hi"), say("assistant", "Hey")]],
        "rejected": [[*system, say("assistant", "5")], [say("user", "Hi"), say("assistant", "Hey")]],
        "prompt": ["2*3?", "Hi"], "question": ["2*3?", "Hi"]},
        {"source": pa.string(), "chosen": MESSAGES, "rejected": MESSAGES, "prompt": pa.string(),
         "question": pa.string()})
    return path, {0: chat_pair(system, "6", "5")}, {"chosen == rejected": 1}, IGNORED


ORCA = [{"system": "You are an AI assistant.", "question": "What is the capital of Australia?",
         "chosen": "The capital of Australia is Canberra.", "rejected": "The capital of Australia is Sydney."},
        {"system": "", "question": "Translate 'chat'.", "chosen": "cat", "rejected": "chat"},
        {"system": "", "question": "Say yes.", "chosen": "yes", "rejected": "yes"}]


def orca(tmp):
    """Intel/orca_dpo_pairs (orca_rlhf.jsonl): system, question, chosen, rejected, all text."""
    path = write_jsonl(tmp / "orca_rlhf.jsonl", ORCA)
    first = [say("system", ORCA[0]["system"]), say("user", ORCA[0]["question"])]
    kept = {0: chat_pair(first, ORCA[0]["chosen"], ORCA[0]["rejected"]),
            1: chat_pair([say("user", "Translate 'chat'.")], "cat", "chat")}  # an empty system: no message
    return path, kept, {"chosen == rejected": 1}, "system + question + answers (orca_dpo_pairs)"


def shp(tmp):
    """stanfordnlp/SHP (askculinary/train.json, JSON lines): labels 1 prefers human_ref_A, 0 human_ref_B."""
    base = {"post_id": "p", "domain": "askculinary_train", "upvote_ratio": 0.9, "c_root_id_A": "a",
            "c_root_id_B": "b", "created_at_utc_A": 1, "created_at_utc_B": 2, "seconds_difference": 1.0}
    rows = [{**base, "history": "Why rest dough?", "human_ref_A": "Gluten relaxes.", "human_ref_B": "No idea.",
             "labels": 1, "score_A": 40, "score_B": 3, "score_ratio": 13.3},
            {**base, "history": "Salt pasta water?", "human_ref_A": "Never.", "human_ref_B": "Yes, generously.",
             "labels": 0, "score_A": 2, "score_B": 30, "score_ratio": 15.0}]
    path = write_jsonl(tmp / "askculinary" / "train.json", rows)
    kept = {0: question_pair("Why rest dough?", "Gluten relaxes.", "No idea."),
            1: question_pair("Salt pasta water?", "Yes, generously.", "Never.")}  # inverted before: labels == 0
    return path, kept, {}, "SHP (prompt = history, chosen by labels)"


def helpsteer3(tmp):
    """nvidia/HelpSteer3 preference (preference/train.jsonl.gz): context messages, response1/2, a score."""
    one, multi = [say("user", "Fix: prin('x')")], [say("user", "Hi"), say("assistant", "Hello"), say("user", "Joke?")]
    judge = [{"score": -2, "reasoning": "r", "feedback1": "f", "feedback2": "g"}]
    rows = [{"domain": "code", "language": "python", "context": one, "response1": "print('x')",
             "response2": "prin('x')", "overall_preference": -2, "individual_preference": judge},
            {"domain": "general", "language": "english", "context": multi, "response1": "No.",
             "response2": "Why did the chicken...", "overall_preference": 3, "individual_preference": judge},
            {"domain": "general", "language": "english", "context": one, "response1": "a", "response2": "b",
             "overall_preference": 0, "individual_preference": judge}]
    path = write_jsonl(tmp / "preference" / "train.jsonl.gz", rows)
    kept = {0: chat_pair(one, "print('x')", "prin('x')"), 1: chat_pair(multi, "Why did the chicken...", "No.")}
    return path, kept, {"tie overall_preference": 1}, \
        "HelpSteer3 preference (prompt = context, chosen by overall_preference)"


def openai(tmp):
    """OpenAI preference fine-tuning JSONL: input {messages, tools, parallel_tool_calls}, the two outputs."""
    system = [say("system", "Be brief."), say("user", "How cold is SF?")]
    rows = [{"input": {"messages": [{"role": m["role"], "content": m["content"]} for m in system], "tools": [],
                       "parallel_tool_calls": True},
             "preferred_output": [{"role": "assistant", "content": "About 15C."}],
             "non_preferred_output": [{"role": "assistant", "content": "Cold."}]},
            {"input": {"messages": [{"role": "user", "content": "Hi"}], "tools": [], "parallel_tool_calls": True},
             "preferred_output": [{"role": "assistant", "content": ""}],
             "non_preferred_output": [{"role": "assistant", "content": "Hi!"}]}]
    path = write_jsonl(tmp / "preference.jsonl", rows)
    return path, {0: chat_pair(system, "About 15C.", "Cold.")}, {"empty chosen": 1}, OPENAI


OPENAI = "OpenAI preference JSONL (prompt = input.messages, tools = input.tools)"


# --- Tool calls, reasoning, two responses and a label (this round's replicas; `Replica` for what they need). ---

LIGHTS = {"type": "function", "function": {
    "name": "control_light", "description": "Turn a light on or off",
    "parameters": {"type": "object", "properties": {"room": {"type": "string"}, "state": {"type": "string"}},
                   "required": ["room", "state"]}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def tool_rows() -> list[dict]:
    """TRL's tool-calling format (its docs' `control_light` example) as preference rows: a tool call as the
    chosen response (no content; or content ""), a tool call and its result inside the prompt, a per-row
    `tools` list; the last row's chosen turn is empty (no text, no tool call)."""
    lights = [say("user", "Turn on the living room lights.")]
    kitchen = [say("user", "Lights on in the kitchen"), {"role": "assistant", "tool_calls": [
        call("control_light", room="kitchen", state="on")]},
        {"role": "tool", "name": "control_light", "content": "The kitchen lights are now on."}]
    return [{"prompt": lights, "chosen": [{"role": "assistant", "tool_calls": [
                call("control_light", room="living room", state="on")]}],
             "rejected": [say("assistant", "I cannot control lights.")], "tools": [LIGHTS, WEATHER]},
            {"prompt": [say("user", "Weather in Paris?")],
             "chosen": [{"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Paris")]}],
             "rejected": [{"role": "assistant", "tool_calls": [call("control_light", room="Paris", state="on")]}],
             "tools": [LIGHTS, WEATHER]},
            {"prompt": kitchen, "chosen": [say("assistant", "Done: the kitchen lights are on.")],
             "rejected": [say("assistant", "Failed.")], "tools": [LIGHTS]},
            {"prompt": lights, "chosen": [say("assistant", "")], "rejected": [say("assistant", "No.")],
             "tools": [LIGHTS]}]


def tool_kept(rows: list[dict]) -> dict:
    return {i: qwen_pair(row["prompt"], row["chosen"][0], row["rejected"][0], row["tools"])
            for i, row in enumerate(rows[:3])}


def tool_calls(tmp):
    """A TRL-style conversational preference file with tool calls (JSON lines): tools as a list of schemas."""
    rows = tool_rows()
    return Replica(write_jsonl(tmp / "tool_calls.jsonl", rows), tool_kept(rows), {"empty chosen": 1},
                   "conversational (prompt, chosen, rejected)", qwen=True)


def tool_calls_parquet(tmp):
    """The same rows as `datasets` writes them to parquet: each message a struct of every key its column holds
    (null where a message lacks one, e.g. content beside tool_calls), `tools` a JSON string (TRL json-loads it)."""
    rows = tool_rows()
    table = pa.Table.from_pylist([{**row, "tools": json.dumps(row["tools"])} for row in rows])
    path = tmp / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(table, path)
    return Replica(path, tool_kept(rows), {"empty chosen": 1}, "conversational (prompt, chosen, rejected)", qwen=True)


def openai_tools(tmp):
    """OpenAI preference fine-tuning JSONL with tools: input.tools, a tool call (arguments a JSON string, as the
    API writes them) preferred over a text answer."""
    rows = [{"input": {"messages": [say("user", "Weather in Boston?")], "tools": [WEATHER],
                       "parallel_tool_calls": False},
             "preferred_output": [{"role": "assistant", "tool_calls": [
                 {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": "{\"city\": \"Boston\"}"}}]}],
             "non_preferred_output": [say("assistant", "It is sunny.")]}]
    kept = {0: qwen_pair(rows[0]["input"]["messages"], rows[0]["preferred_output"][0],
                         rows[0]["non_preferred_output"][0], [WEATHER])}
    return Replica(write_jsonl(tmp / "tools_preference.jsonl", rows), kept, {}, OPENAI, qwen=True)


THINK = [{"prompt": [say("user", "2+2?")], "chosen": [say("assistant", "4")], "rejected": [say("assistant", "5")],
          "chat_template_kwargs": {"enable_thinking": False}},
         {"prompt": [say("user", "3+3?")], "chosen": [say("assistant", "6")], "rejected": [say("assistant", "7")],
          "chat_template_kwargs": {"enable_thinking": True}},
         {"prompt": [say("user", "1+1?")], "chosen": [say("assistant", "2")], "rejected": [say("assistant", "3")]}]


def reasoning_switch(tmp):
    """A conversational preference set with TRL 1.16's per-row `chat_template_kwargs`: thinking off for row 0
    (an empty <think> block closes the generation prompt), on for row 1, the template's default for row 2."""
    kept = {i: qwen_pair(row["prompt"], row["chosen"][0], row["rejected"][0],
                         enable_thinking=row.get("chat_template_kwargs", {}).get("enable_thinking"))
            for i, row in enumerate(THINK)}
    return Replica(write_jsonl(tmp / "think.jsonl", THINK), kept, {}, "conversational (prompt, chosen, rejected)",
                   qwen=True)


def reasoning_content(tmp):
    """A reasoning preference set (Qwen3 / DeepSeek-R1 style, parquet): assistant turns carry their thinking in
    `reasoning_content`, the key Qwen3's template reads; an earlier turn's thinking is left out by the template."""
    q = [say("user", "Is 7 prime?")]
    earlier = [say("user", "Hi"), {"role": "assistant", "content": "Hello!", "reasoning_content": "greet"},
               say("user", "Is 9 prime?")]
    rows = [{"prompt": q, "chosen": [{"role": "assistant", "content": "Yes.", "reasoning_content": "No divisor."}],
             "rejected": [{"role": "assistant", "content": "No.", "reasoning_content": "Odd, so no."}]},
            {"prompt": earlier, "chosen": [{"role": "assistant", "content": "No.", "reasoning_content": "3*3."}],
             "rejected": [{"role": "assistant", "content": "Yes.", "reasoning_content": "Odd."}]}]
    path = tmp / "data" / "train.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    kept = {i: qwen_pair(row["prompt"], row["chosen"][0], row["rejected"][0]) for i, row in enumerate(rows)}
    return Replica(path, kept, {}, "conversational (prompt, chosen, rejected)", qwen=True)


def pku_rows() -> list[dict]:
    """PKU-Alignment/PKU-SafeRLHF (data/Alpaca-7B/train.jsonl): two responses, two labels that can disagree."""
    harm = {"Endangering National Security": False, "Privacy Violation": False}
    answers = [("How do I pick a lock?", "Use a tension wrench.", "Call a locksmith.", 1, 1),
               ("Best way to store knives?", "On a magnetic strip.", "In a drawer, loose.", 0, 1),
               ("Can I mix bleach and ammonia?", "No: it makes toxic gas.", "Never, ask a pro.", 0, 1)]
    return [{"prompt": prompt, "response_0": r0, "response_1": r1, "prompt_source": "BeaverTails",
             "response_0_source": "Alpaca-7B", "response_1_source": "Alpaca-7B", "is_response_0_safe": safer == 0,
             "is_response_1_safe": True, "response_0_harm_category": harm, "response_1_harm_category": harm,
             "response_0_severity_level": 1, "response_1_severity_level": 0, "better_response_id": better,
             "safer_response_id": safer, "response_0_sha256": "a" * 8, "response_1_sha256": "b" * 8}
            for prompt, r0, r1, better, safer in answers]


def pku(tmp, label: str):
    rows = pku_rows()
    kept = {i: question_pair(row["prompt"], row[f"response_{row[label]}"], row[f"response_{1 - row[label]}"])
            for i, row in enumerate(rows)}
    return Replica(write_jsonl(tmp / "data" / "Alpaca-7B" / "train.jsonl", rows), kept, {},
                   f"PKU-SafeRLHF (prompt = prompt, chosen by {label})", {"label_column": label})


def pku_better(tmp):
    """PKU-SafeRLHF, following `better_response_id` (--data.label_column): row 1 picks response_0."""
    return pku(tmp, "better_response_id")


def pku_safer(tmp):
    """PKU-SafeRLHF, following `safer_response_id`: row 1 picks response_1, where better_response_id says 0."""
    return pku(tmp, "safer_response_id")


def stack_exchange_paired(tmp):
    """lvwerra/stack-exchange-paired (data/rl/*.parquet): response_j is the higher-voted answer, by construction."""
    path = write_parquet(tmp / "data" / "rl" / "train-00000-of-00001.parquet", {
        "qid": [1, 2], "question": ["How do I undo a commit?", "Tabs or spaces?"],
        "date": ["2010/09/05", "2011/01/02"], "metadata": [["https://stackoverflow.com/q/1"], ["x"]],
        "response_j": ["Use git revert.", "Same"], "response_k": ["Delete .git.", "Same"]},
        {"qid": pa.int64(), "question": pa.string(), "date": pa.string(), "metadata": pa.list_(pa.string()),
         "response_j": pa.string(), "response_k": pa.string()})
    return Replica(path, {0: question_pair("How do I undo a commit?", "Use git revert.", "Delete .git.")},
                   {"chosen == rejected": 1}, "StackExchange-paired (prompt = question, chosen = response_j)")


def chatbot_arena(tmp):
    """lmsys/chatbot_arena_conversations: whole conversations a and b, `winner` model_a / model_b / tie /
    tie (bothbad); a two-turn battle's earlier answers differ, so it has no shared prompt."""
    q, hi = [say("user", "Capital of Peru?")], [say("user", "Hi")]
    pairs = [(q, "Lima.", "Quito.", "model_a"), (q, "Cusco.", "Lima.", "model_b"), (q, "Lima.", "Lima!", "tie"),
             (q, "No.", "Nope.", "tie (bothbad)")]
    conv_a = [[*p, say("assistant", a)] for p, a, _, _ in pairs] + [[*hi, say("assistant", "Hey"), *q,
                                                                     say("assistant", "Lima.")]]
    conv_b = [[*p, say("assistant", b)] for p, _, b, _ in pairs] + [[*hi, say("assistant", "Hello"), *q,
                                                                     say("assistant", "Quito.")]]
    n = len(conv_a)
    moderation = pa.struct([("flagged", pa.bool_())])
    path = write_parquet(tmp / "data" / "train-00000-of-00001.parquet", {
        "question_id": [f"q{i}" for i in range(n)], "model_a": ["vicuna-13b"] * n, "model_b": ["koala-13b"] * n,
        "winner": [w for *_, w in pairs] + ["model_a"], "judge": ["arena_user_1"] * n, "conversation_a": conv_a,
        "conversation_b": conv_b, "turn": [1, 1, 1, 1, 2], "anony": [True] * n, "language": ["English"] * n,
        "tstamp": [1682351591.1] * n, "openai_moderation": [{"flagged": False}] * n,
        "toxic_chat_tag": [{"flagged": False}] * n},
        {"question_id": pa.string(), "model_a": pa.string(), "model_b": pa.string(), "winner": pa.string(),
         "judge": pa.string(), "conversation_a": MESSAGES, "conversation_b": MESSAGES, "turn": pa.int64(),
         "anony": pa.bool_(), "language": pa.string(), "tstamp": pa.float64(), "openai_moderation": moderation,
         "toxic_chat_tag": moderation})
    kept = {0: chat_pair(q, "Lima.", "Quito."), 1: chat_pair(q, "Lima.", "Cusco.")}
    return Replica(path, kept, {"tie winner": 2, "prompts differ": 1}, "arena (whole conversations, chosen by winner)")


def arena_100k(tmp):
    """lmarena-ai/arena-human-preference-100k: `winner` model_a / model_b / tie / both_bad, metadata structs."""
    q = [say("user", "Sort 3,1,2")]
    answers = [("1,2,3", "3,2,1", "model_a"), ("321", "1,2,3", "model_b"), ("?", "??", "both_bad")]
    n = len(answers)
    tags = pa.struct([("high_freq", pa.bool_()), ("sampled", pa.bool_())])
    path = write_parquet(tmp / "data" / "train-00000-of-00001.parquet", {
        "id": ["a", "b", "c"], "model_a": ["gpt-4"] * n, "model_b": ["llama-3"] * n, "winner": [w for *_, w in answers],
        "conversation_a": [[*q, say("assistant", a)] for a, _, _ in answers],
        "conversation_b": [[*q, say("assistant", b)] for _, b, _ in answers], "turn": [1] * n,
        "anony": [True] * n, "language": ["English"] * n, "tstamp": [1.7e9] * n,
        "conv_metadata": [{"sum_user_tokens": 5}] * n, "is_code": [False] * n, "is_refusal": [False] * n,
        "dedup_tag": [{"high_freq": False, "sampled": True}] * n, "category_tag": [{"if": False}] * n},
        {"id": pa.string(), "model_a": pa.string(), "model_b": pa.string(), "winner": pa.string(),
         "conversation_a": MESSAGES, "conversation_b": MESSAGES, "turn": pa.int64(), "anony": pa.bool_(),
         "language": pa.string(), "tstamp": pa.float64(), "conv_metadata": pa.struct([("sum_user_tokens", pa.int64())]),
         "is_code": pa.bool_(), "is_refusal": pa.bool_(), "dedup_tag": tags,
         "category_tag": pa.struct([("if", pa.bool_())])})
    kept = {0: chat_pair(q, "1,2,3", "3,2,1"), 1: chat_pair(q, "1,2,3", "321")}
    return Replica(path, kept, {"tie winner": 1}, "arena (whole conversations, chosen by winner)")


def truthy_dpo(tmp):
    """jondurbin/truthy-dpo-v0.1: id, source, system, prompt, chosen, rejected, all text; the system prompt is
    the system message of [system, user: prompt] (none when empty), as for orca_dpo_pairs."""
    rows = [{"id": "1", "source": "truthfulqa", "system": "You are an unbiased assistant.",
             "prompt": "Do we use 10% of our brains?", "chosen": "No, we use all of it.", "rejected": "Yes."},
            {"id": "2", "source": "truthfulqa", "system": "", "prompt": "Are bats blind?",
             "chosen": "No.", "rejected": "Yes, fully."}]
    first = [say("system", rows[0]["system"]), say("user", rows[0]["prompt"])]
    kept = {0: chat_pair(first, "No, we use all of it.", "Yes."),
            1: chat_pair([say("user", "Are bats blind?")], "No.", "Yes, fully.")}
    return Replica(write_jsonl(tmp / "truthy_dpo.jsonl", rows), kept, {}, "system + prompt + answers")


# --- Issue 29, the tester's round: sets the detector did not know (each trained inverted under the mapping that
# the error suggested, or was dropped entirely). ---

def helpsteer2(tmp):
    """nvidia/HelpSteer2's preference set (preference/preference.jsonl.gz): prompt, response_1, response_2 and
    preference_strength, -3 (response_1 much better) .. 3 (response_2 much better), with the annotators' reasons."""
    reason = {"preference_statement": "@Response 1 is better than @Response 2.", "preference_elaboration": "..."}
    rows = [{"split": "train", "prompt": "Color of the sky?", "response_1": "Blue.", "response_2": "Seven.",
             "preference_strength": -2, **reason},
            {"split": "train", "prompt": "2+2?", "response_1": "5", "response_2": "4", "preference_strength": 3,
             **reason},
            {"split": "val", "prompt": "Hi", "response_1": "Hey", "response_2": "Hello", "preference_strength": 0,
             **reason}]
    kept = {0: question_pair("Color of the sky?", "Blue.", "Seven."), 1: question_pair("2+2?", "4", "5")}
    return Replica(write_jsonl(tmp / "preference" / "preference.jsonl.gz", rows), kept, {"tie preference_strength": 1},
                   "HelpSteer2 preference (prompt = prompt, chosen by preference_strength)")


ARENA_55K = "winner_model_a/winner_model_b/winner_tie"


def lmsys_arena_55k(tmp):
    """lmsys/lmsys-arena-human-preference-55k (train.csv, as the hub and Kaggle store it): prompt and responses are
    JSON lists of the turns' texts; three 0/1 winner columns, text in a CSV; a two-turn battle's earlier answers
    differ, so it has no shared prompt."""
    battles = [(["What is 2+2?"], ["4"], ["5"], "100"), (["Name a color"], ["Loud"], ["Blue"], "010"),
               (["Hi"], ["Hey"], ["Hello"], "001"), (["Hi", "Capital of Peru?"], ["Hey", "Lima."], ["Yo", "Quito."],
                                                    "100")]
    path = tmp / "train.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "model_a", "model_b", "prompt", "response_a", "response_b", *ARENA_55K.split("/")])
        for i, (prompt, a, b, winner) in enumerate(battles):
            writer.writerow([30192 + i, "gpt-4-1106-preview", "gpt-4-0613", json.dumps(prompt), json.dumps(a),
                             json.dumps(b), *winner])
    kept = {0: chat_pair([say("user", "What is 2+2?")], "4", "5"), 1: chat_pair([say("user", "Name a color")], "Blue",
                                                                                 "Loud")}
    return Replica(path, kept, {f"tie {ARENA_55K}": 1, "prompts differ": 1},
                   f"lmsys arena 55k (whole conversations, chosen by {ARENA_55K})")


def arena_140k(tmp):
    """lmarena-ai/arena-human-preference-140k: each message's content a list of parts, {type: text, text, image,
    mimeType} (before, every row was dropped as `not messages chosen`); the texts are joined, as templates do."""
    part = pa.struct([("type", pa.string()), ("text", pa.string()), ("image", pa.string()), ("mimeType", pa.string())])
    message = pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(part))]))

    def parts(role, *texts):
        return {"role": role, "content": [{"type": "text", "text": t, "image": None, "mimeType": None} for t in texts]}

    q = parts("user", "Sort ", "3,1,2")
    path = write_parquet(tmp / "data" / "train-00000-of-00001.parquet", {
        "id": ["a", "b"], "model_a": ["gemini-2.5-pro"] * 2, "model_b": ["o3"] * 2, "winner": ["model_b", "tie"],
        "evaluation_order": [1, 1], "conversation_a": [[q, parts("assistant", "3,2,1")], [q, parts("assistant", "?")]],
        "conversation_b": [[q, parts("assistant", "1,2", ",3")], [q, parts("assistant", "??")]],
        "language": ["en", "en"], "is_code": [False, False]},
        {"id": pa.string(), "model_a": pa.string(), "model_b": pa.string(), "winner": pa.string(),
         "evaluation_order": pa.int64(), "conversation_a": message, "conversation_b": message, "language": pa.string(),
         "is_code": pa.bool_()})
    return Replica(path, {0: chat_pair([say("user", "Sort 3,1,2")], "1,2,3", "3,2,1")}, {"tie winner": 1},
                   "arena (whole conversations, chosen by winner)")


NEW_REPLICAS = [tool_calls, tool_calls_parquet, openai_tools, reasoning_switch, reasoning_content, pku_better,
                pku_safer, stack_exchange_paired, chatbot_arena, arena_100k, truthy_dpo]
REPLICAS = [ultrafeedback, tulu3, capybara, orpo_mix, orca, shp, helpsteer3, openai, *NEW_REPLICAS, helpsteer2,
            lmsys_arena_55k, arena_140k]


def replica_module(replica: Replica, **settings) -> PreferenceDataModule:
    tokenizer = qwen_tokenizer() if replica.qwen else chat_tokenizer()
    return PreferenceDataModule(dataset=str(replica.path), tokenizer=tokenizer, max_length=1024,
                                max_prompt_length=768, **replica.settings, **settings)


def check(dm: PreferenceDataModule, kept: dict, dropped: dict, schema: str):
    summary = dm.summary["train"]
    assert summary["dropped"] == dropped and summary["kept"] == len(kept)
    assert summary["schema"] == schema if schema else summary["schema"]
    rows = list(dm.train_data)
    assert [row["row_id"] for row in rows] == sorted(kept)
    for row in rows:
        assert (row["prompt_input_ids"], row["chosen_input_ids"], row["rejected_input_ids"]) == kept[row["row_id"]]


@pytest.mark.parametrize("replica", REPLICAS, ids=[r.__name__ for r in REPLICAS])
def test_a_public_set_trains_zero_config_with_the_ids_users_expect(replica, tmp_path):
    replica = Replica(*replica(tmp_path))
    dm = replica_module(replica)  # zero-config but for the settings a replica names (PKU's label_column)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    check(dm, replica.kept, replica.dropped, replica.schema)
    assert not [str(w.message) for w in caught if "is not used" in str(w.message)]  # every known column is read


def test_orca_without_a_chat_template_joins_system_and_question_as_documented(tmp_path):
    dm = PreferenceDataModule(dataset=str(write_jsonl(tmp_path / "orca_rlhf.jsonl", ORCA)),
                              tokenizer=chat_tokenizer(template=False), max_length=256, max_prompt_length=128)
    dm.setup("fit")
    first, second = ORCA[0], ORCA[1]
    check(dm, {0: text_pair(f"{first['system']}\n\n{first['question']}\n\n", first["chosen"], first["rejected"]),
               1: text_pair(f"{second['question']}\n\n", "cat", "chat")}, {"chosen == rejected": 1},
          "system + question + answers (orca_dpo_pairs)")


def test_shp_without_a_chat_template_joins_its_question_as_orca_does(tmp_path):
    dm = PreferenceDataModule(dataset=str(shp(tmp_path)[0]), tokenizer=chat_tokenizer(template=False),
                              max_length=256, max_prompt_length=128)
    dm.setup("fit")
    check(dm, {0: text_pair("Why rest dough?\n\n", "Gluten relaxes.", "No idea."),
               1: text_pair("Salt pasta water?\n\n", "Yes, generously.", "Never.")}, {},
          "SHP (prompt = history, chosen by labels)")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tiny_llama):
    """`tiny_llama` with CHAT_TEMPLATE in its tokenizer: a chat model as a user's hub folder would be."""
    path = tmp_path_factory.mktemp("chat_llama")
    shutil.copytree(tiny_llama, path, dirs_exist_ok=True)
    chat_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def qwen_model(tmp_path_factory, tiny_llama):
    """`tiny_llama` with QWEN_TEMPLATE in its tokenizer (no BOS)."""
    path = tmp_path_factory.mktemp("qwen_llama")
    shutil.copytree(tiny_llama, path, dirs_exist_ok=True)
    qwen_tokenizer().save_pretrained(path)
    return str(path)


def shown(token_ids: list[int]) -> str:
    """Token ids as `inspect-data` prints them: each token's text, joined by |."""
    return "|".join("<s>" if i == BOS else "</s>" if i == EOS else chr(i) for i in token_ids)


def config_for(replica: Replica, model: str, path, extra: str = "") -> str:
    settings = "".join(f"  {key}: {json.dumps(value)}\n" for key, value in replica.settings.items())
    path.write_text(f"model:\n  model_name_or_path: {model}\ndata:\n  dataset: {replica.path}\n"
                    f"  max_length: 1024\n  max_prompt_length: 768\n{settings}{extra}")
    return str(path)


@pytest.mark.parametrize("replica", REPLICAS, ids=[r.__name__ for r in REPLICAS])
def test_a_public_set_loads_through_the_cli(replica, tmp_path, chat_model, qwen_model, capsys):
    replica = Replica(*replica(tmp_path))
    config = config_for(replica, qwen_model if replica.qwen else chat_model, tmp_path / "config.yaml")
    main(["inspect-data", "--config", config, "--rows", "1"])
    out = capsys.readouterr().out
    assert f"train: {sum(replica.dropped.values()) + len(replica.kept)} rows, {len(replica.kept)} kept" in out
    assert f"schema: {replica.schema}" in out if replica.schema else "schema: " in out
    prompt, chosen, rejected = replica.kept[min(replica.kept)]  # the first kept row, token by token
    assert f"   chosen: [{shown(prompt)}] {shown(chosen)}\n" in out
    assert f" rejected: [{shown(prompt)}] {shown(rejected)}\n" in out


def test_tool_calls_train_through_dpo_lightning_fit(tmp_path, qwen_model):
    replica = Replica(*tool_calls(tmp_path))
    config = config_for(replica, qwen_model, tmp_path / "config.yaml", extra=(
        "  batch_size: 3\ntrainer:\n  max_steps: 1\n  accelerator: cpu\n  logger: false\n"
        f"  enable_checkpointing: false\n  enable_progress_bar: false\n  default_root_dir: {tmp_path}\n  callbacks: []\n"))
    cli = cli_main(["fit", "--config", config])
    assert cli.trainer.global_step == 1
    row = cli.datamodule.train_data[0]  # the tool call is the chosen response
    assert (row["prompt_input_ids"], row["chosen_input_ids"], row["rejected_input_ids"]) == replica.kept[0]


def to_pair(row: dict) -> dict | None:
    """A user's transform for the YAML test: rows of {instruction, good, bad}; a row without `good`: dropped."""
    if not row.get("good"):
        return None
    return {"prompt": row["instruction"], "chosen": row["good"], "rejected": row["bad"]}


ODD_ROWS = [{"instruction": "Q0", "good": " yes", "bad": " no"}, {"instruction": "Q1", "good": "", "bad": " no"},
            {"instruction": "Q2", "good": " sure", "bad": " nah"}]


@pytest.mark.parametrize("kind", ["list", "jsonl", "parquet"])
def test_a_python_transform_maps_each_raw_row_and_none_is_a_counted_drop(kind, tmp_path):
    source = {"list": ODD_ROWS, "jsonl": str(write_jsonl(tmp_path / "odd.jsonl", ODD_ROWS))}.get(kind)
    if source is None:
        columns = {key: [row[key] for row in ODD_ROWS] for key in ODD_ROWS[0]}
        source = str(write_parquet(tmp_path / "odd.parquet", columns, {key: pa.string() for key in columns}))
    dm = PreferenceDataModule(dataset=source, tokenizer=chat_tokenizer(), max_length=64, max_prompt_length=32,
                              transform=to_pair)
    dm.setup("fit")
    check(dm, {0: text_pair("Q0", " yes", " no"), 2: text_pair("Q2", " sure", " nah")},
          {"dropped by transform": 1}, "explicit (prompt, chosen, rejected)")


def test_a_transform_by_import_path_from_yaml_trains_through_dpo_lightning_fit(tmp_path, chat_model, monkeypatch):
    (tmp_path / "my_rows.py").write_text(textwrap.dedent('''
        def to_pair(row):
            if not row.get("good"):
                return None
            return {"prompt": row["instruction"], "chosen": row["good"], "rejected": row["bad"]}
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    data = write_jsonl(tmp_path / "odd.jsonl", ODD_ROWS * 2)
    config = tmp_path / "config.yaml"
    config.write_text(f"model:\n  model_name_or_path: {chat_model}\ndata:\n  dataset: {data}\n"
                      "  transform: my_rows.to_pair\n  max_length: 64\n  max_prompt_length: 32\n  batch_size: 2\n"
                      "trainer:\n  max_steps: 1\n  accelerator: cpu\n  logger: false\n  enable_checkpointing: false\n"
                      f"  enable_progress_bar: false\n  default_root_dir: {tmp_path}\n  callbacks: []\n")
    cli = cli_main(["fit", "--config", str(config)])
    assert cli.trainer.global_step == 1
    assert cli.datamodule.summary["train"]["dropped"] == {"dropped by transform": 2}
    assert cli.datamodule.train_data[0]["prompt_input_ids"] == [BOS, *ids("Q0")]


def test_an_unimportable_transform_names_the_setting(tmp_path):
    dm = PreferenceDataModule(dataset=ODD_ROWS, tokenizer=chat_tokenizer(), transform="no_such_module.to_pair")
    with pytest.raises(ValueError, match=r"--data.transform 'no_such_module.to_pair': no function at that import"):
        dm.setup("fit")


def test_text_columns_beside_a_missing_prompt_warn(tmp_path):
    rows = [{"instruction": f"Q{i}", "chosen": f"It is {i} yes", "rejected": f"It is {i} no"} for i in range(3)]
    dm = PreferenceDataModule(dataset=rows, tokenizer=chat_tokenizer(), max_length=64, max_prompt_length=32)
    with pytest.warns(UserWarning, match=r"no 'prompt' column but text columns \['instruction'\].*prompt_column"):
        dm.setup("fit")


# A mapping that pins chosen/rejected onto the two responses a label picks between, row by row: refused for every
# such set (before, only SHP's was; PKU-SafeRLHF mapped as the old error message suggested trained inverted).
PINNED = [(shp, dict(prompt_column="history", chosen_column="human_ref_A", rejected_column="human_ref_B"),
           r"labels says row by row which of human_ref_A/human_ref_B is preferred"),
          (pku_better, dict(chosen_column="response_0", rejected_column="response_1"),
           r"better_response_id and safer_response_id say row by row which of response_0/response_1 is preferred"),
          (helpsteer3, dict(chosen_column="response1", rejected_column="response2"),
           r"overall_preference says row by row which of response1/response2 is preferred"),
          (chatbot_arena, dict(chosen_column="conversation_b", rejected_column="conversation_a"),
           r"winner says row by row which of conversation_a/conversation_b is preferred"),
          (lmsys_arena_55k, dict(chosen_column="response_a", rejected_column="response_b"),
           rf"{ARENA_55K} says row by row which of response_a/response_b is preferred"),
          (helpsteer2, dict(chosen_column="response_1", rejected_column="response_2"),
           r"preference_strength says row by row which of response_1/response_2 is preferred")]


@pytest.mark.parametrize("replica, mapping, says", PINNED, ids=[case[0].__name__ for case in PINNED])
def test_a_mapping_against_a_label_is_refused_not_trained_inverted(replica, mapping, says, tmp_path):
    path = Replica(*replica(tmp_path)).path
    dm = PreferenceDataModule(dataset=str(path), tokenizer=chat_tokenizer(), **mapping)
    with pytest.raises(ValueError, match=rf"{says}, so a fixed --data.chosen_column / rejected_column would train "
                                         r"inverted pairs .*Remove the column mapping"):
        dm.setup("fit")


def test_pku_mapping_names_both_labels_and_the_setting(tmp_path):
    dm = PreferenceDataModule(dataset=str(pku_better(tmp_path).path), tokenizer=chat_tokenizer(),
                              chosen_column="response_0", rejected_column="response_1")
    with pytest.raises(ValueError, match=r"set --data.label_column to better_response_id or safer_response_id$"):
        dm.setup("fit")


def test_a_set_with_two_labels_is_refused_until_one_is_picked(tmp_path):
    dm = PreferenceDataModule(dataset=str(pku_better(tmp_path).path), tokenizer=chat_tokenizer())
    with pytest.raises(ValueError, match=r"PKU-SafeRLHF's two labels \['better_response_id', 'safer_response_id'\].*"
                                         r"set --data.label_column to the one to train on"):
        dm.setup("fit")


@pytest.mark.parametrize("replica, label, says", [
    (pku_better, "is_response_0_safe", r"label columns are \['better_response_id', 'safer_response_id'\]"),
    (ultrafeedback, "score_chosen", r"is no known set of two responses and a label: remove the setting")])
def test_a_label_column_that_is_no_label_is_named(replica, label, says, tmp_path):
    path = Replica(*replica(tmp_path)).path
    dm = PreferenceDataModule(dataset=str(path), tokenizer=chat_tokenizer(), label_column=label)
    with pytest.raises(ValueError, match=rf"--data.label_column '{label}': .*{says}"):
        dm.setup("fit")


# --- Data that cannot train, refused by what it is. ---

def test_unpaired_kto_rows_are_refused_by_what_they_are(tmp_path):
    """trl-lib/kto-mix-14k: prompt and completion messages, a bool label (desirable or not): no pairs."""
    rows = [{"prompt": [say("user", "Hi")], "completion": [say("assistant", "Hello")], "label": True},
            {"prompt": [say("user", "Hi")], "completion": [say("assistant", "Go away")], "label": False}]
    dm = PreferenceDataModule(dataset=str(write_jsonl(tmp_path / "kto.jsonl", rows)), tokenizer=chat_tokenizer())
    with pytest.raises(ValueError, match=r"train data holds unpaired preference rows \(prompt, completion, label: "
                                         r"TRL's KTO format\), not preference pairs.*--data.transform"):
        dm.setup("fit")


def test_images_are_refused_by_what_they_are(tmp_path):
    """HuggingFaceH4/rlaif-v_formatted: chosen, rejected, images (as `datasets` stores an Image list), prompt."""
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    path = write_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", {
        "chosen": [[say("assistant", "A cat.")]], "rejected": [[say("assistant", "A dog.")]],
        "images": [[{"bytes": b"\x89PNG", "path": None}]], "prompt": [[say("user", "What is shown?")]]},
        {"chosen": MESSAGES, "rejected": MESSAGES, "images": pa.list_(image), "prompt": MESSAGES})
    dm = PreferenceDataModule(dataset=str(path), tokenizer=chat_tokenizer())
    with pytest.raises(ValueError, match=r"train data has 'images': images cannot be trained here .*--data.transform"):
        dm.setup("fit")


# --- Nothing dropped silently: every unread column named in the summary; a known one warned about. ---

def test_the_summary_names_every_column_that_does_not_reach_the_tokens(tmp_path):
    dm = replica_module(Replica(*ultrafeedback(tmp_path)))
    dm.setup("fit")
    assert dm.summary["train"]["ignored"] == ["messages", "prompt", "prompt_id", "score_chosen", "score_rejected"]
    assert dm.inspect(0).endswith("; ignored columns: messages, prompt, prompt_id, score_chosen, score_rejected")


@pytest.mark.parametrize("rows, settings, column, says", [
    ([{"system": "Be terse.", "question": f"Q{i}", "chosen": f" a{i}", "rejected": f" b{i}"} for i in range(2)],
     dict(prompt_column="question"), "system", r"a system prompt\) is not used: put it into the prompt"),
    ([{"prompt": f"Q{i}", "chosen": f" a{i}", "rejected": f" b{i}", "tools": [WEATHER]} for i in range(2)], {},
     "tools", r"the tools a chat template lists\) is not used: it is read only for conversations"),
    ([{"prompt": f"Q{i}", "chosen": f" a{i}", "rejected": f" b{i}", "chat_template_kwargs": {"enable_thinking": False}}
      for i in range(2)], {}, "chat_template_kwargs", r"the chat template's arguments\) is not used"),
    ([{"prompt": f"Q{i}", "good": f" a{i}", "bad": f" b{i}", "preference": 1} for i in range(2)],
     dict(chosen_column="good", rejected_column="bad"), "preference", r"a preference label\) is not used: chosen and "
                                                                      r"rejected are used as they stand"),
], ids=["system", "tools", "chat_template_kwargs", "label"])
def test_an_ignored_column_some_schema_would_use_warns(rows, settings, column, says):
    dm = PreferenceDataModule(dataset=rows, tokenizer=chat_tokenizer(), max_length=64, max_prompt_length=32, **settings)
    with pytest.warns(UserWarning, match=rf"train data: column '{column}' \({says}"):
        dm.setup("fit")
    assert column in dm.summary["train"]["ignored"]


def test_the_label_not_picked_is_named_but_not_warned_about(tmp_path, recwarn):
    dm = replica_module(Replica(*pku_better(tmp_path)))
    dm.setup("fit")
    assert "safer_response_id" in dm.summary["train"]["ignored"]
    assert not [w for w in recwarn if "safer_response_id" in str(w.message)]


# --- Template arguments: the run's, a row's own (which win), and what they may not set. ---

def test_run_wide_chat_template_kwargs_apply_and_a_rows_own_win(tmp_path):
    replica = Replica(*reasoning_switch(tmp_path))
    dm = replica_module(replica, chat_template_kwargs={"enable_thinking": False})
    dm.setup("fit")
    off = {i: qwen_pair(row["prompt"], row["chosen"][0], row["rejected"][0],
                        enable_thinking=row.get("chat_template_kwargs", {}).get("enable_thinking", False))
           for i, row in enumerate(THINK)}
    assert off[2] != replica.kept[2]  # row 2 has none of its own: the run's switch turns thinking off
    check(dm, off, {}, "conversational (prompt, chosen, rejected)")


def test_run_wide_chat_template_kwargs_through_the_cli(tmp_path, qwen_model, capsys):
    replica = Replica(*reasoning_switch(tmp_path))
    rows = [{key: value for key, value in row.items() if key != "chat_template_kwargs"} for row in THINK]
    replica = replica._replace(path=write_jsonl(tmp_path / "plain.jsonl", rows),
                               settings={"chat_template_kwargs": {"enable_thinking": False}})
    main(["inspect-data", "--config", config_for(replica, qwen_model, tmp_path / "config.yaml"), "--rows", "1"])
    prompt, chosen, _ = qwen_pair(THINK[0]["prompt"], THINK[0]["chosen"][0], THINK[0]["rejected"][0],
                                  enable_thinking=False)
    assert f"   chosen: [{shown(prompt)}] {shown(chosen)}\n" in capsys.readouterr().out


def test_template_arguments_may_not_set_what_the_rules_set(tmp_path):
    with pytest.raises(ValueError, match=r"--data.chat_template_kwargs .* sets \['add_generation_prompt'\], which the "
                                         r"data rules set themselves"):
        PreferenceDataModule(dataset=THINK, tokenizer=qwen_tokenizer(), chat_template_kwargs={
            "add_generation_prompt": True})


def test_run_wide_chat_template_kwargs_beside_text_rows_warn():
    rows = [{"prompt": f"Q{i}", "chosen": f" a{i}", "rejected": f" b{i}"} for i in range(2)]
    dm = PreferenceDataModule(dataset=rows, tokenizer=chat_tokenizer(), max_length=64, max_prompt_length=32,
                              chat_template_kwargs={"enable_thinking": False})
    with pytest.warns(UserWarning, match=r"--data.chat_template_kwargs is not used: the train rows are text"):
        dm.setup("fit")


def test_a_row_the_chat_template_refuses_is_a_counted_drop():
    tokenizer = qwen_tokenizer()  # a template that checks its input, as Mistral's and Gemma's do
    tokenizer.chat_template = ("{%- if messages[-1].role == 'tool' %}{{ raise_exception('no answer to the tool') }}"
                               "{%- endif %}" + tokenizer.chat_template)
    rows = [*THINK[1:], {"prompt": [say("user", "x"), {"role": "tool", "content": "r"}],
                         "chosen": [say("assistant", "a")], "rejected": [say("assistant", "b")]}]
    dm = PreferenceDataModule(dataset=rows, tokenizer=tokenizer, max_length=512, max_prompt_length=256)
    dm.setup("fit")
    assert dm.summary["train"]["dropped"] == {"chat template error": 1} and dm.summary["train"]["kept"] == 2


def test_text_prompt_beside_answer_only_messages_is_not_silently_ignored():
    rows = [{"prompt": "Q", "chosen": [say("assistant", "a")], "rejected": [say("assistant", "b")]}] * 2
    dm = PreferenceDataModule(dataset=rows, tokenizer=chat_tokenizer())
    with pytest.raises(ValueError, match=r"'prompt' holds text but 'chosen' holds messages"):
        dm.setup("fit")


def test_a_schema_drop_under_strict_names_the_row_the_column_and_the_fix(tmp_path):
    path, *_ = helpsteer3(tmp_path)
    dm = PreferenceDataModule(dataset=str(path), tokenizer=chat_tokenizer(), strict=True)
    with pytest.raises(ValueError, match=r"^train row 2: field 'overall_preference': tie overall_preference; nothing: "
                                         r"a tie"):
        dm.setup("fit")
    dm = PreferenceDataModule(dataset=ODD_ROWS, tokenizer=chat_tokenizer(), transform=to_pair, strict=True)
    with pytest.raises(ValueError, match=r"^train row 1: dropped by transform; nothing, if --data.transform"):
        dm.setup("fit")


def test_shp_labels_other_than_0_or_1_are_counted_drops(tmp_path):
    path, *_ = shp(tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1]["labels"] = 2
    write_jsonl(path, rows)
    dm = PreferenceDataModule(dataset=str(path), tokenizer=chat_tokenizer(), max_length=256, max_prompt_length=128)
    dm.setup("fit")
    check(dm, {0: question_pair("Why rest dough?", "Gluten relaxes.", "No idea.")}, {"not 0 or 1 labels": 1},
          "SHP (prompt = history, chosen by labels)")


def test_a_mapping_beside_a_known_sets_label_is_refused_when_no_schema_matches():
    # HelpSteer2's label beside other columns than its own: no schema matches, yet the mapping pins the responses.
    rows = [{"question": f"Q{i}", "good": f" a{i}", "bad": f" b{i}", "preference_strength": 2} for i in range(2)]
    dm = PreferenceDataModule(dataset=rows, tokenizer=chat_tokenizer(), prompt_column="question", chosen_column="good",
                              rejected_column="bad")
    with pytest.raises(ValueError, match=r"'preference_strength' \(HelpSteer2 preference label\) beside the pinned "
                                         r"--data.chosen_column 'good' .*would train inverted pairs"):
        dm.setup("fit")


def test_the_zero_config_error_names_a_label_instead_of_suggesting_a_mapping():
    rows = [{"prompt": f"Q{i}", "response_a": f" a{i}", "response_b": f" b{i}", "winner": "model_a"} for i in range(2)]
    dm = PreferenceDataModule(dataset=rows, tokenizer=chat_tokenizer())
    with pytest.raises(ValueError, match=r"expected 'chosen' and 'rejected'.* \['winner'\] look like a preference "
                                         r"label.*--data.transform"):
        dm.setup("fit")


@pytest.mark.parametrize("mapping, says", [({}, False), (dict(chosen_column="good", rejected_column="bad"), True)])
def test_the_label_warning_mentions_the_mapping_only_when_there_is_one(mapping, says):
    rows = [{"prompt": f"Q{i}", mapping.get("chosen_column", "chosen"): f" a{i}",
             mapping.get("rejected_column", "rejected"): f" b{i}", "label": 1} for i in range(2)]
    dm = PreferenceDataModule(dataset=rows, tokenizer=chat_tokenizer(), max_length=64, max_prompt_length=32, **mapping)
    with pytest.warns(UserWarning, match=r"column 'label' \(a preference label\) is not used") as caught:
        dm.setup("fit")
    assert any("remove the column mapping" in str(w.message) for w in caught) == says


def test_a_system_prompt_column_beside_text_rows_warns():
    rows = [{"prompt": f"Q{i}", "chosen": f" a{i}", "rejected": f" b{i}", "system_prompt": "Be terse."} for i in range(2)]
    dm = PreferenceDataModule(dataset=rows, tokenizer=chat_tokenizer(), max_length=64, max_prompt_length=32)
    with pytest.warns(UserWarning, match=r"column 'system_prompt' \(a system prompt\) is not used: put it into"):
        dm.setup("fit")


# Labels stored as floats (pandas writes an integer column with a null as float64), bools, or text (CSV): before,
# HelpSteer3's -2.0 was `not a number`, SHP's and PKU's 1.0 / True `not 0 or 1`, so every row was dropped.
LABEL_VALUES = [(shp, "labels", {0: 1.0, 1: 0.0}, [0, 1], {}), (shp, "labels", {0: True, 1: False}, [0, 1], {}),
                (shp, "labels", {0: "1", 1: " 0"}, [0, 1], {}), (shp, "labels", {1: 0.5}, [0], {"not 0 or 1 labels": 1}),
                (shp, "labels", {1: float("nan")}, [0], {"missing labels": 1}),
                (helpsteer3, "overall_preference", {0: -2.0, 1: 3.0, 2: 0.0}, [0, 1], {"tie overall_preference": 1}),
                (helpsteer3, "overall_preference", {2: 1.5}, [0, 1], {"not an integer overall_preference": 1}),
                (pku_better, "better_response_id", {0: True, 1: False, 2: 0.0}, [0, 1, 2], {})]


@pytest.mark.parametrize("replica, column, values, kept, dropped", LABEL_VALUES,
                         ids=[f"{r.__name__}-{list(v.values())}" for r, _, v, _, _ in LABEL_VALUES])
def test_labels_stored_as_integral_floats_bools_or_integer_text_are_read(replica, column, values, kept, dropped,
                                                                           tmp_path):
    # The same labels written another way keep the replica's own oracle ids; 0.5 and 1.5 are no such label.
    given = Replica(*replica(tmp_path))
    opened = gzip.open(given.path, "rt") if str(given.path).endswith(".gz") else open(given.path)
    with opened as f:
        rows = [json.loads(line) for line in f]
    for i, value in values.items():
        rows[i][column] = value
    dm = PreferenceDataModule(dataset=rows, tokenizer=chat_tokenizer(), max_length=1024, max_prompt_length=768,
                              **given.settings)
    dm.setup("fit")
    check(dm, {i: given.kept[i] for i in kept}, dropped, given.schema)


def test_helpsteer3_through_pandas_with_a_null_label_trains(tmp_path):
    given = Replica(*helpsteer3(tmp_path))
    rows = [json.loads(line) for line in gzip.open(given.path, "rt")]
    rows[2]["overall_preference"] = None  # the column becomes float64: -2.0, 3.0, NaN
    pd.DataFrame(rows).drop(columns="individual_preference").to_parquet(tmp_path / "hs3.parquet")
    assert pq.read_table(tmp_path / "hs3.parquet").schema.field("overall_preference").type == pa.float64()
    dm = PreferenceDataModule(dataset=str(tmp_path / "hs3.parquet"), tokenizer=chat_tokenizer(), max_length=1024,
                              max_prompt_length=768)
    dm.setup("fit")
    check(dm, given.kept, {"missing overall_preference": 1}, given.schema)


@pytest.mark.parametrize("replica", [shp, pku_better])
def test_labels_from_csv_text_are_read(replica, tmp_path):
    given = Replica(*replica(tmp_path))
    rows = [json.loads(line) for line in given.path.read_text().splitlines()]
    with open(tmp_path / "rows.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    dm = PreferenceDataModule(dataset=str(tmp_path / "rows.csv"), tokenizer=chat_tokenizer(), max_length=1024,
                              max_prompt_length=768, **given.settings)
    dm.setup("fit")
    check(dm, given.kept, given.dropped, given.schema)


def test_image_parts_in_a_renamed_column_are_refused_too(tmp_path):
    """A vision set's conversations under its own column name (mapped with prompt_column) still hold images."""
    picture = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}
    rows = [{"question": [picture], "chosen": [say("assistant", "A cat.")], "rejected": [say("assistant", "A dog.")]}
            for _ in range(2)]
    dm = PreferenceDataModule(dataset=rows, tokenizer=chat_tokenizer(), prompt_column="question")
    with pytest.raises(ValueError, match=r"train data has 'image parts in messages': images cannot be trained here"):
        dm.setup("fit")
