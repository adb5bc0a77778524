"""The studio's content policy for the free text players type, matched after normalisation.

The policy is a YAML file (`gateway/content_policy.yaml`, or the studio's own mounted with
FORGE_CONTENT_POLICY): categories of blocked terms and phrases, an allowlist of phrases
that contain a blocked term but are fine (a "bastard sword" is a weapon), and a negative
prompt added to every image the policy covers. Edits take effect without a restart: the
file is read again when it changes; an edit that does not parse keeps the policy in force
(and is logged).

Text and terms are normalised the same way before they are compared, so that the usual
evasions meet the term they hide:

- Unicode compatibility forms (NFKC: fullwidth, mathematical and ligature letters), then
  accents dropped (NFKD without combining marks), case folded;
- invisible characters removed (format characters: zero-width spaces and joiners, soft
  hyphens, byte-order marks);
- letters that look like Latin ones (Cyrillic, Greek, Armenian, Cherokee look-alikes, from
  Unicode's confusables list) mapped to them; no maintained library maps Unicode's
  confusables to a skeleton cheaply (unidecode transliterates by sound: Cyrillic "р"
  becomes "r", not the "p" it looks like), so the table is here;
- digits and symbols used for letters (`0`->o, `1`/`!`/`|`->i, `3`->e, `4`/`@`->a,
  `5`/`$`->s, `7`/`+`->t, `8`->b, `9`->g; a symbol only where a letter or digit follows),
  and `l` folded into `i` on both sides (`1`, `l` and `i` are one shape to a reader).

Matching is by whole words, which is what keeps ordinary words safe ("assassin's dagger"
and "Scunthorpe" contain terms but are other words): the text is split at whitespace and
punctuation into words; a word spelled out a letter at a time ("n u d e", "n.u.d.e") is
joined back into one; a chunk between spaces with punctuation inside ("nu.de") is also
read as the word it spells. A phrase matches its words in a row, or written as one word.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

log = logging.getLogger(__name__)
audit = logging.getLogger("gateway.audit")

Mode = Literal["strict", "review", "off"]
MODES: tuple[Mode, ...] = ("strict", "review", "off")

# Look-alikes of Latin letters (after case folding), from Unicode's confusables.txt.
CONFUSABLES = str.maketrans(
    {
        # Cyrillic
        "а": "a", "в": "b", "с": "c", "ԁ": "d", "е": "e", "ё": "e", "һ": "h", "і": "i",
        "ї": "i", "ј": "j", "к": "k", "ӏ": "i", "м": "m", "н": "h", "о": "o", "р": "p",
        "ԛ": "q", "г": "r", "ѕ": "s", "т": "t", "џ": "u", "ѵ": "v", "ԝ": "w", "х": "x",
        "у": "y", "з": "3", "ь": "b", "п": "n",
        # Greek
        "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "μ": "u", "ν": "v",
        "ο": "o", "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "γ": "y", "ω": "w", "σ": "o",
        "ς": "s",
        # Armenian, Cherokee and others often used for the same trick
        "ս": "u", "ո": "n", "հ": "h", "օ": "o", "ց": "g", "ե": "t", "ᴀ": "a", "ʙ": "b",
        "ᴄ": "c", "ᴅ": "d", "ᴇ": "e", "ɢ": "g", "ʜ": "h", "ɪ": "i", "ᴊ": "j", "ᴋ": "k",
        "ʟ": "l", "ᴍ": "m", "ɴ": "n", "ᴏ": "o", "ᴘ": "p", "ʀ": "r", "ꜱ": "s", "ᴛ": "t",
        "ᴜ": "u", "ᴠ": "v", "ᴡ": "w", "ʏ": "y", "ᴢ": "z", "ı": "i", "ȷ": "j", "ɑ": "a",
        "ɡ": "g", "ꭰ": "d", "ꭱ": "r", "ꮪ": "s", "ꮇ": "m",
    }
)  # fmt: skip
# Digits read as letters, and `l` folded into `i`, on text and terms alike; symbols read
# as letters where a letter or digit follows them (a trailing "!" stays punctuation).
LEET = str.maketrans(
    {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g", "l": "i"}
)
SYMBOLS = {"!": "i", "|": "i", "@": "a", "$": "s", "+": "t"}
SYMBOL_IN_WORD = re.compile(r"[!|@$+](?=\w)")
BETWEEN_WORDS = re.compile(r"[\W_]+")


def normalise(text: str) -> str:
    """The text as matching sees it (see the module's docstring), words still separated."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    text = unicodedata.normalize("NFKD", text.casefold())
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = SYMBOL_IN_WORD.sub(lambda m: SYMBOLS[m.group()], text.translate(CONFUSABLES))
    return text.translate(LEET)


def words(chunks: list[str]) -> list[str]:
    """The words of a normalised text's chunks (its parts between whitespace): split at
    punctuation, a word spelled out a letter at a time joined back together."""
    found: list[str] = []
    letters: list[str] = []
    for chunk in chunks:
        parts = [p for p in BETWEEN_WORDS.split(chunk) if p]
        if len(parts) > 1 and all(len(p) == 1 for p in parts):  # "n.u.d.e" in one chunk
            parts = ["".join(parts)]
        if len(parts) == 1 and len(parts[0]) == 1:
            letters.append(parts[0])
            continue
        if letters:
            found.append("".join(letters))
            letters = []
        found.extend(parts)
    if letters:
        found.append("".join(letters))
    return found


def chunk_words(chunks: list[str]) -> set[str]:
    """Each chunk read as one word with its punctuation dropped ("nu.de")."""
    return {"".join(BETWEEN_WORDS.split(chunk)) for chunk in chunks}


def phrase(term: str) -> tuple[str, ...]:
    """A term or phrase of the policy file as the words it matches."""
    return tuple(words(normalise(term).split()))


def occurs(needle: tuple[str, ...], haystack: list[str]) -> list[int]:
    """Where the words of `needle` start in a row in `haystack`."""
    n = len(needle)
    return [i for i in range(len(haystack) - n + 1) if tuple(haystack[i : i + n]) == needle]


@dataclass(frozen=True)
class ContentPolicy:
    """Blocked terms by category, the allowlist, and the negative prompt always added."""

    categories: dict[str, tuple[tuple[str, ...], ...]]
    allow: tuple[tuple[str, ...], ...]
    negative_prompt: str

    @classmethod
    def parse(cls, data: object, where: str) -> ContentPolicy:
        """The policy of a parsed YAML document; ValueError naming what is wrong."""
        if not isinstance(data, dict) or not isinstance(data.get("categories"), dict):
            raise ValueError(f"{where}: a mapping with `categories` (name: [terms]) is needed")
        categories = {}
        for name, terms in data["categories"].items():
            if not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
                raise ValueError(f"{where}: category {name!r} is not a list of terms")
            found = tuple(p for p in map(phrase, terms) if p)
            categories[str(name)] = found
        allow = data.get("allow", [])
        if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
            raise ValueError(f"{where}: `allow` is not a list of phrases")
        negative = data.get("negative_prompt", "")
        if not isinstance(negative, str):
            raise ValueError(f"{where}: `negative_prompt` is not text")
        return cls(categories, tuple(p for p in map(phrase, allow) if p), negative.strip())

    def violations(self, texts: Iterable[str]) -> list[str]:
        """The categories the texts fall in (empty: none), in the file's order."""
        found: list[str] = []
        for text in texts:
            parts = normalise(text).split()  # normalised once, read two ways
            seen, chunks = words(parts), chunk_words(parts)
            allowed = {i + k for a in self.allow for i in occurs(a, seen) for k in range(len(a))}
            for name, terms in self.categories.items():
                if name not in found and any(
                    self._matches(t, seen, chunks, allowed) for t in terms
                ):
                    found.append(name)
        return found

    @staticmethod
    def _matches(
        term: tuple[str, ...], seen: list[str], chunks: set[str], allowed: set[int]
    ) -> bool:
        for start in occurs(term, seen):
            if not all(start + k in allowed for k in range(len(term))):
                return True
        joined = "".join(term)
        if len(term) > 1 and joined in seen:  # "selfharm" for "self harm"
            i = seen.index(joined)
            if i not in allowed:
                return True
        return joined in chunks and joined not in seen

    def with_negative(self, negative_prompt: str) -> str:
        """A request's negative prompt with the policy's added in front."""
        return ", ".join(p for p in (self.negative_prompt, negative_prompt.strip()) if p)


class PolicyFile:
    """The policy of a file, read again when the file changes (its mtime or size)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self.policy = self._read()

    def _read(self) -> ContentPolicy:
        stat = os.stat(self.path)
        policy = ContentPolicy.parse(yaml.safe_load(self.path.read_text()), str(self.path))
        self._stamp = (stat.st_mtime, stat.st_size)
        return policy

    def current(self) -> ContentPolicy:
        """The policy in force: the file's, read again if it changed since; if the changed
        file cannot be read, the policy read before (the error logged once per change)."""
        try:
            stat = os.stat(self.path)
            if (stat.st_mtime, stat.st_size) != self._stamp:
                self._stamp = (stat.st_mtime, stat.st_size)
                self.policy = self._read()
                log.info("content policy %s read again", self.path)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            log.error("content policy %s not reloaded, the previous one stays: %s", self.path, exc)
        return self.policy


def audit_refusal(key_id: str, route: str, category: str, texts: Iterable[str]) -> None:
    """One audit log line for a refusal: who, where, which category, and a hash of the text
    (SHA-256 of the texts joined by newlines), never the text itself."""
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    audit.warning(
        json.dumps(
            {
                "event": "content_policy_refusal",
                "key_id": key_id,
                "route": route,
                "category": category,
                "text_sha256": digest,
            }
        )
    )
