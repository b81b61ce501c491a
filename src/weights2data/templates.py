"""Prompt and chat templates: how a text becomes the tokens a model reads (DESIGN §6).

A template wraps the text; the label (classification) or the completion (language modelling)
follows it. Three kinds:
- plain: the text as it is, `text + " " + label` (the original's format, the default);
- a text template such as "Review: {text}\nSentiment:" (exactly one `{text}` slot);
- chat: the tokenizer's own chat template. Classification: the text is the user turn, the label
  the start of the assistant turn. Language modelling: the text is the assistant turn, after an
  empty user turn, and only the assistant turn is scored (as an SFT trainer scores completions).

Truncation removes text tokens only, never template tokens: from the left for classification,
so the label position stays last, from the right for language modelling. Each prompt is
tokenised whole, as a trainer would, and split into template and text tokens by character
offsets, so without truncation the tokens are exactly those of the whole string.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from weights2data.data import Encoded, check_seq_len, encode_classification, encode_lm
from weights2data.errors import W2DError

SLOT = "{text}"
PROBE = "W2DTEXTSLOT"  # stands in for the text when a chat template is rendered once
KINDS = ("classification", "lm")


@dataclass(frozen=True)
class Template:
    """A text template (`text` with one {text} slot), the tokenizer's chat template, or plain."""

    text: str | None = None
    chat: bool = False

    def __post_init__(self) -> None:
        if self.text is not None and self.chat:
            raise W2DError(
                "--template and --chat-template exclude each other: the chat template is a template"
            )
        if self.text is not None and self.text.count(SLOT) != 1:
            raise W2DError(f"a template needs exactly one {SLOT} slot, where the text goes: {self.text!r}")

    @property
    def plain(self) -> bool:
        return self.text is None and not self.chat

    @property
    def label_lead(self) -> str:
        """What comes between the prompt and the label word: a space, unless the prompt ends in
        whitespace (a chat template's assistant turn starts on a new line)."""
        if self.chat or (self.text is not None and self.text[-1:].isspace()):
            return ""
        return " "

    def to_dict(self) -> dict | None:
        return None if self.plain else {"text": self.text, "chat": self.chat}

    @classmethod
    def from_dict(cls, d: dict | None) -> Template:
        return cls() if not d else cls(d.get("text"), bool(d.get("chat")))

    def describe(self) -> str:
        return "the chat template" if self.chat else "plain" if self.plain else repr(self.text)

    def parts(self, tokenizer: PreTrainedTokenizerBase, kind: str) -> tuple[str, str, bool]:
        """(before, after, strip): the prompt is before + text + after (text stripped when `strip`)."""
        if self.text is not None:
            before, _, after = self.text.partition(SLOT)
            return before, after, False
        if not self.chat:
            return "", "", False
        return chat_parts(tokenizer, kind)

    def prompt(self, tokenizer: PreTrainedTokenizerBase, text: str, kind: str = "classification") -> str:
        """The whole prompt string of one text (for a classifier, the label token follows it)."""
        before, after, strip = self.parts(tokenizer, kind)
        return before + (text.strip() if strip else text) + after


PLAIN = Template()


def chat_parts(tokenizer: PreTrainedTokenizerBase, kind: str) -> tuple[str, str, bool]:
    """The tokenizer's chat template around one message, rendered once with a stand-in text.

    Templates that trim the message (`| trim`) are detected by rendering a padded stand-in; the
    texts are then stripped too, so prefix + text + suffix is what apply_chat_template renders.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise W2DError(
            "--chat-template: this tokenizer has no chat template (tokenizer_config.json has no "
            "chat_template); pass the prompt format with --template instead"
        )
    probe = f" {PROBE} "
    if kind == "classification":
        messages = [{"role": "user", "content": probe}]
    else:
        messages = [{"role": "user", "content": ""}, {"role": "assistant", "content": probe}]
    rendered = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=kind == "classification"
    )
    if rendered.count(PROBE) != 1:
        raise W2DError("--chat-template: the tokenizer's chat template does not place the message text once")
    start = rendered.index(PROBE)
    if rendered[start - 1 : start] == " " and rendered[start + len(PROBE) : start + len(PROBE) + 1] == " ":
        return rendered[: start - 1], rendered[start + len(PROBE) + 1 :], False
    return rendered[:start], rendered[start + len(PROBE) :], True


def resolve_template(text: str | None, chat: bool, meta: dict | None = None) -> Template:
    """The template a flag names (a string, or a file holding it), else the one a model recorded
    in its metadata (w2d.json), else plain."""
    if chat:
        return Template(chat=True)
    if text is not None:
        path = Path(text).expanduser()
        if SLOT not in text and path.is_file():
            text = path.read_text().removesuffix("\n")  # an editor's final newline is not the template's
        else:  # a flag typed in a shell: "\n" means a newline
            text = text.replace("\\n", "\n").replace("\\t", "\t")
        return Template(text)
    return Template.from_dict(((meta or {}).get("task") or {}).get("template"))


def encode(
    template: Template, tokenizer: PreTrainedTokenizerBase, texts: list[str], seq_len: int, kind: str
) -> Encoded:
    """Token ids of `texts` in `template`, seq_len tokens per example with the label token included
    (classification: the label comes after the seq_len - 1 tokens returned, left-padded; language
    modelling: seq_len tokens, right-padded, with `target_mask` on the completion)."""
    if kind not in KINDS:
        raise W2DError(f"unknown task kind '{kind}': choose from {', '.join(KINDS)}")
    if template.plain:
        encoder = encode_classification if kind == "classification" else encode_lm
        return encoder(tokenizer, texts, seq_len)
    check_seq_len(seq_len)
    width = seq_len - 1 if kind == "classification" else seq_len
    rows, targets = [], []
    for before, text, after in split_tokens(template, tokenizer, texts, kind):
        keep = width - len(before) - len(after)
        if keep < 1:
            raise W2DError(
                f"the template {template.describe()} takes {len(before) + len(after)} tokens, leaving "
                f"no room for the text in --seq-len {seq_len}; raise --seq-len"
            )
        text = text[-keep:] if kind == "classification" else text[:keep]
        rows.append(before + text + after)
        targets.append([False] * len(before) + [True] * (len(text) + len(after)))
    return pad_rows(rows, targets, width, tokenizer.pad_token_id, left=kind == "classification")


def split_tokens(
    template: Template, tokenizer: PreTrainedTokenizerBase, texts: list[str], kind: str
) -> list[tuple[list[int], list[int], list[int]]]:
    """Per text: the token ids of its whole prompt, split into (template before, text, template after).

    A token that straddles the text's start (" one" after "Review:") counts as text, so it is cut
    with the text's start; one that straddles its end counts as the template's and is never cut.
    """
    before, after, strip = template.parts(tokenizer, kind)
    texts = [t.strip() for t in texts] if strip else texts
    try:
        enc = tokenizer(
            [before + t + after for t in texts], add_special_tokens=False, return_offsets_mapping=True
        )
    except NotImplementedError as exc:
        raise W2DError("templates need a fast tokenizer (a tokenizer.json beside the model)") from exc
    out = []
    for ids, offsets, text in zip(enc["input_ids"], enc["offset_mapping"], texts, strict=True):
        start, end = len(before), len(before) + len(text)
        first = sum(1 for _, e in offsets if e <= start)  # tokens of the template before the text
        last = max(first, sum(1 for _, e in offsets if e <= end))  # tokens up to the text's end
        out.append((ids[:first], ids[first:last], ids[last:]))
    return out


def pad_rows(
    rows: list[list[int]], targets: list[list[bool]], width: int, pad_id: int, left: bool
) -> Encoded:
    """Rows padded to `width`, with the attention mask and the mask of tokens the loss scores."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, scored) in enumerate(zip(rows, targets, strict=True)):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, cols] = torch.tensor(row, dtype=torch.long)
        mask[i, cols] = 1
        target[i, cols] = torch.tensor(scored)
    return Encoded(ids, mask, target if not left else None)


def label_token_ids(
    template: Template, tokenizer: PreTrainedTokenizerBase, tokens: list[str]
) -> list[list[int]]:
    """The ids each label string (lead included, e.g. " positive") becomes where it follows a prompt.

    Tokenised after a rendered prompt and the prompt's own tokens removed, so the ids are those a
    trainer saw after the template; a label that merges with the prompt's last token is an error.
    """
    prompt = template.prompt(tokenizer, "x") if not template.plain else "x"
    head = tokenizer.encode(prompt, add_special_tokens=False)
    out = []
    for token in tokens:
        ids = tokenizer.encode(prompt + token, add_special_tokens=False)
        if ids[: len(head)] != head:
            raise W2DError(
                f"the label {token!r} merges with the end of the prompt {prompt[-20:]!r} into one token; "
                "choose other label words or end the template differently"
            )
        out.append(ids[len(head) :])
    return out
