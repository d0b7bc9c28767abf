"""Personal data and secrets in text: finding them, and replacing them. Django-free.

Detection leans on maintained libraries rather than our own regexes: presidio-analyzer's pattern
recognizers (e-mail, payment cards with the Luhn check, IBAN with its checksum, US SSN with its
invalid ranges, IP addresses), phonenumbers (through presidio's phone recognizer) for phone
numbers, and detect-secrets' plugin patterns for API keys, tokens, private keys and passwords in
URLs. Person names come from a list the team gives (always) and from a spaCy NER model when one
is installed; none ships offline, so without one names are found only from the list, and the UI
says so.

A finding is a `Span` over the text it was found in; `redact` replaces spans with a mask
(`[EMAIL]`) or a numbered pseudonym (`[EMAIL_3]`) that the caller chose per type.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import importlib.util
import re
import threading
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# Types, in the order the findings page lists them, with what a user calls them.
TYPES: dict[str, str] = {
    "PERSON": "Person names",
    "EMAIL": "E-mail addresses",
    "PHONE": "Phone numbers",
    "CREDIT_CARD": "Payment card numbers",
    "IBAN": "Bank account numbers (IBAN)",
    "US_SSN": "US social security numbers",
    "IP_ADDRESS": "IP addresses",
    "URL_CREDENTIALS": "Passwords in web addresses",
    "SECRET": "API keys, tokens and private keys",
}

KEEP, MASK, PSEUDONYM = "keep", "mask", "pseudonym"
POLICIES: dict[str, str] = {
    KEEP: "Keep as is",
    MASK: "Mask",
    PSEUDONYM: "Pseudonym",
}
# What a new project does. Things with no use in an answer (card numbers, bank accounts, SSNs,
# credentials, keys) are masked; contact details and names are kept, because in most domain
# documents they are the support address or the author, and masking them silently would change
# answers. The findings page shows every one of them, and the team decides.
DEFAULT_POLICY: dict[str, str] = {
    "PERSON": KEEP,
    "EMAIL": KEEP,
    "PHONE": KEEP,
    "CREDIT_CARD": MASK,
    "IBAN": MASK,
    "US_SSN": MASK,
    "IP_ADDRESS": KEEP,
    "URL_CREDENTIALS": MASK,
    "SECRET": MASK,
}

# When two findings overlap, the one whose type comes first here wins (then the longer one):
# a card number is also a phone number to phonenumbers; "user:pw@host" is also an e-mail.
# An IBAN (checked by its mod-97 checksum) beats a card: 16 of its digits pass Luhn one time in ten.
_PRIORITY = [
    "SECRET",
    "URL_CREDENTIALS",
    "IBAN",
    "CREDIT_CARD",
    "US_SSN",
    "EMAIL",
    "IP_ADDRESS",  # phonenumbers reads 192.168.10.20 as a phone number
    "PHONE",
    "PERSON",
]

# Presidio scores below this are its "very weak" patterns (any 9 digits as an SSN, say), which
# in technical text are mostly ports, sizes and ids.
MIN_SCORE = 0.3

# Characters per call of the NER model.
NER_WINDOW = 100_000

# Phone numbers are matched for these regions as well as in international (+…) form.
PHONE_REGIONS = ("US", "GB", "DE", "FR", "NL", "ES", "IT", "CA", "AU", "IN", "BR")


@dataclass(frozen=True)
class Span:
    type: str
    start: int
    end: int
    text: str
    detector: str
    score: float = 1.0


def policy_with_defaults(policy: dict[str, str] | None) -> dict[str, str]:
    """Every type's policy: the project's where it chose one, the default elsewhere."""
    chosen = policy or {}
    return {t: chosen.get(t) if chosen.get(t) in POLICIES else DEFAULT_POLICY[t] for t in TYPES}


def normalise(type_: str, text: str) -> str:
    """The value a pseudonym stands for: the same person written two ways is one person."""
    text = unicodedata.normalize("NFKC", text).strip()
    if type_ in ("CREDIT_CARD", "US_SSN"):
        return re.sub(r"\D", "", text)
    if type_ == "IBAN":
        return re.sub(r"\s", "", text).upper()
    if type_ == "PHONE":
        return _phone_e164(text) or re.sub(r"[^\d+]", "", text)
    if type_ == "PERSON":
        return " ".join(text.casefold().split())
    if type_ in ("EMAIL", "IP_ADDRESS"):
        return text.casefold()
    return text


def digest(salt: str, type_: str, text: str) -> str:
    """A keyed hash of the normalised value: what the database keeps instead of the value."""
    return hmac.new(salt.encode(), f"{type_}\0{normalise(type_, text)}".encode(), hashlib.sha256).hexdigest()


def placeholder(type_: str, number: int | str | None = None) -> str:
    return f"[{type_}]" if number is None else f"[{type_}_{number}]"


def redact(text: str, replacements: Iterable[tuple[int, int, str]]) -> str:
    """`text` with each (start, end) span replaced. Spans may come in any order; overlapping
    ones keep the first (in text order) and drop the rest."""
    out: list[str] = []
    position = 0
    for start, end, replacement in sorted(replacements):
        if start < position or end > len(text) or start >= end:
            continue
        out.append(text[position:start])
        out.append(replacement)
        position = end
    out.append(text[position:])
    return "".join(out)


# --------------------------------------------------------------------------------------------
# Detectors


def _phone_e164(text: str) -> str | None:
    import phonenumbers

    for region in (None, *PHONE_REGIONS):
        try:
            number = phonenumbers.parse(text, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number):
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return None


@functools.cache
def _presidio_recognizers() -> list[tuple[str, Any]]:
    """Presidio's pattern recognizers, used one by one: the AnalyzerEngine would load a spaCy
    model for context words, which is not there offline and not needed for patterns."""
    import tldextract
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
        UsSsnRecognizer,
    )

    # Presidio checks an e-mail's domain with tldextract, whose default fetches the public
    # suffix list from the internet on first use; the list shipped in the package is enough.
    offline = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    class OfflineEmailRecognizer(EmailRecognizer):  # type: ignore[misc]
        def validate_result(self, pattern_text: str) -> bool:
            return offline(pattern_text).fqdn != ""

    return [
        ("EMAIL", OfflineEmailRecognizer()),
        ("CREDIT_CARD", CreditCardRecognizer()),
        ("IBAN", IbanRecognizer()),
        ("US_SSN", UsSsnRecognizer()),
        ("IP_ADDRESS", IpRecognizer()),
        ("PHONE", PhoneRecognizer(supported_regions=PHONE_REGIONS)),
    ]


@functools.cache
def _secret_patterns() -> list[tuple[str, str, re.Pattern[str]]]:
    """detect-secrets' regex plugins as (type, plugin name, pattern). Its keyword and
    high-entropy plugins are left out: in prose they flag every "password: see below" and
    every hash in a changelog."""
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
    from detect_secrets.plugins.base import RegexBasedDetector

    skip = {"BasicAuthDetector", "IPPublicDetector"}
    patterns: list[tuple[str, str, re.Pattern[str]]] = []
    for plugin in get_mapping_from_secret_type_to_class().values():
        if not issubclass(plugin, RegexBasedDetector) or plugin.__name__ in skip:
            continue
        patterns += [("SECRET", plugin.secret_type, pattern) for pattern in plugin().denylist]
    from detect_secrets.plugins.basic_auth import BasicAuthDetector

    patterns += [("URL_CREDENTIALS", "Basic Auth Credentials", p) for p in BasicAuthDetector().denylist]
    return patterns


_PRIVATE_KEY_END = re.compile(
    r"-----END[A-Z ]*PRIVATE KEY[A-Z ]*-----|PuTTY-User-Key-File.*?(?=\n\n|\Z)", re.S
)
_URL_USERINFO = re.compile(r"://([^\s/@]+)@")


# A JSON Web Token's three parts: detect-secrets' pattern ends lazily after the second dot, so
# on its own it would leave the signature (the part that makes the token usable) unredacted.
_JWT_TAIL = re.compile(r"[A-Za-z0-9_\-+/=]*")


def _secret_spans(text: str) -> list[Span]:
    spans: list[Span] = []
    for type_, name, pattern in _secret_patterns():
        for match in pattern.finditer(text):
            start, end = match.span()
            if type_ == "URL_CREDENTIALS":
                # The user:password part only: the host stays readable ("https://[URL_CREDENTIALS]@db.example.org").
                userinfo = _URL_USERINFO.search(text, max(0, start - 1), end + 1)
                if userinfo is None:
                    continue
                start, end = userinfo.span(1)
            elif name == "Private Key":
                # The plugin matches the header line; the key is the whole block.
                block_end = _PRIVATE_KEY_END.search(text, end)
                line_start = text.rfind("\n", 0, start) + 1
                start = line_start if text[line_start:start].strip("- ") == "" else start
                end = block_end.end() if block_end else end
            elif name == "JSON Web Token":
                tail = _JWT_TAIL.match(text, end)
                end = tail.end() if tail and text[end - 1] == "." else end
            elif match.lastindex and match.end(match.lastindex) - match.start(match.lastindex) >= 16:
                # Plugins that capture the secret in a group ("password = <secret>") report that;
                # short groups are prefixes ("ghp"), and then the whole match is the secret.
                start, end = match.span(match.lastindex)
            spans.append(Span(type_, start, end, text[start:end], f"detect-secrets: {name}"))
    return spans


# Look-alikes. Presidio's patterns and phonenumbers' matcher check that a value *can* be what it
# looks like; in technical documents many strings that can be are not. Each rule below rejects a
# candidate from its shape and its immediate surroundings, and is tested on both sides.

# A word before a dotted number that makes it a version, or a section or item number, not an
# address (and, for versions, not a phone number either).
_VERSION_WORDS = re.compile(
    r"\b(?:version|versions|ver|v|release|releases|rel|revision|rev|build|kernel|linux|firmware|patch|isbn|issn)"
    r"\.?\s*$",
    re.IGNORECASE,
)
_SECTION_WORDS = re.compile(
    r"(?:\b(?:section|sections|chapter|chapters|sec|part|step|item|no|nr)\.?|§)\s*$", re.IGNORECASE
)
# A heading or line that starts with a section number: "#### 12.2.1.1 What is...", "8.1.6.1. dpkg-deb"
# (but not "10.1.2.3 web", a hosts-file line).
_HEADING_START = re.compile(r"(?:^|\n)[ \t]*#+[ \t]*$")
_LINE_START = re.compile(r"(?:^|\n)[ \t]*$")
_SECTION_NUMBER_END = re.compile(r"[.)][ \t]+\S")
# Words that make a run of bare digits a phone number ("call 4155552671").
_PHONE_WORDS = re.compile(
    r"\b(?:phone|telephone|tel|call|fax|mobile|cell|cellphone|sms|whatsapp|contact|hotline)\b\W{0,3}"
    r"(?:\w+\W{1,3}){0,3}$",
    re.IGNORECASE,
)
# Dates that phonenumbers accepts as numbers in some region: 30.05.2021, 12/05/2021, 2021-05-12.
_DATE = re.compile(r"(?:\d{1,2}[./-]\d{1,2}[./-](?:\d{4}|\d{2})|\d{4}[./-]\d{1,2}[./-]\d{1,2})")
_DATE_PREFIX = re.compile(r"(?:\d{4}-\d{1,2}-\d{1,2}|\d{1,2}[./-]\d{1,2}[./-]\d{4})(?!\d)")
# Four dotted groups of up to three digits are an IPv4 address or a version/section number
# ("0.12.2.25+dfsg", "section 13.8.8.16"); when the IP rules reject one, it is not a phone either.
_DOTTED_QUAD = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
_SSN_SHAPE = re.compile(r"(?<!\d)\d{3}-\d{2}-\d{4}(?!\d)")
# Sixteen digits in fours is a card's shape (one failing the Luhn check is an id, not a phone).
_CARD_SHAPE = re.compile(r"\d{4}([ -])\d{4}\1\d{4}\1\d{1,4}")
# The start of an IBAN-shaped run ("NL88 PARR " or "ES8764421516"): digits after it belong to
# the IBAN, which, if its checksum failed, is not a card or a phone number either.
_IBAN_SHAPE_BEFORE = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){0,7} ?$")
# Numbers the SSA never issued or that were published in advertisements and used by thousands
# of people (the Woolworth wallet card, 078-05-1120; the 1940s SSA pamphlet, 219-09-9999).
_SSN_PUBLISHED = frozenset({"078051120", "219099999", "457555462"})


def _looks_like_version(text: str, start: int, end: int) -> bool:
    """A dotted quad that is a version ("release 10.0.0.1-rc", "libfoo-1.2.3.4") or a section
    number ("8.1.6.1. dpkg-deb"), not an IPv4 address."""
    before, after = text[max(0, start - 40) : start], text[end : end + 3]
    if before[-1:].isalpha() or before[-1:] in ("-", "_", ".") or re.match(r"\.\d|[-+~][A-Za-z0-9]", after):
        return True  # glued to a name, part of a longer dotted number, or with a version suffix
    if _VERSION_WORDS.search(before) or _SECTION_WORDS.search(before):
        return True
    if _HEADING_START.search(before):
        return True
    return bool(_LINE_START.search(before) and _SECTION_NUMBER_END.match(text, end))


def _trimmed(type_: str, text: str, start: int, end: int) -> tuple[int, int]:
    """phonenumbers keeps an opening parenthesis that has no closing one in the number
    ("(+44 20 7946 0958)" gives "(+44 20 7946 0958"); the number starts after it."""
    if type_ == "PHONE" and text[start] == "(" and ")" not in text[start:end]:
        start += 1
    return start, end


# Numbers in technical text that phonenumbers accepts: decimals ("0.65655958650282"), ranges
# ("0.29..656.28"), fractions and paths ("16384/16806"), times and MAC-like runs.
_NOT_A_PHONE = re.compile(r"\.\.|/|:|^-|^\d+\.\d+$")
_MAC_SHAPE = re.compile(r"[0-9A-Fa-f]{2}(?:[:-][0-9A-Fa-f]{2}){5}(?:[:-][0-9A-Fa-f]{2}){0,2}")
_CARD_GROUPS = [[4, 4, 4, 4], [4, 6, 5], [4, 6, 4], [4, 4, 4, 4, 3], [4, 4, 4, 3]]


def _glued_to_a_number(text: str, start: int, end: int) -> bool:
    """A match that is only part of a longer token: "CVE-2026-116303", "1.1752011936438014",
    "192.168/24", "base/16384" — its neighbour is a letter, a digit, or a joiner followed by one."""
    before, after = text[max(0, start - 2) : start], text[end : end + 2]
    if before[-1:].isalnum() or after[:1].isalnum():
        return True
    # "tel:+44…" and "Card: 4111…" are fine: a colon after a word only labels what follows; after
    # a digit it is a time ("04:05:06.789-8").
    if before[-1:] in ".-/_" and before[:1].isalnum() and len(before) == 2 and text[start] != "+":
        return True
    if before == before[:1] + ":" and before[:1].isdigit():
        return True
    return after[:1] in ".-/:_" and after[1:2].isalnum()


def _plausible(type_: str, text: str, start: int, end: int) -> bool:
    """Whether a pattern match of `type_` at text[start:end] survives the look-alike rules."""
    value = text[start:end]
    if type_ in ("PHONE", "CREDIT_CARD") and _IBAN_SHAPE_BEFORE.search(text[max(0, start - 40) : start]):
        return False
    if type_ in ("PHONE", "CREDIT_CARD") and _glued_to_a_number(text, start, end):
        return False
    if type_ == "CREDIT_CARD":
        if text[start - 1 : start] == "+":  # "+5511961236891" is a phone number
            return False
        # Printed cards group their digits 4-4-4-4 (4-6-5 for Amex, 4-6-4 for Diners), or not at
        # all; "1499414498 86248" is two numbers in a table that happen to pass Luhn.
        groups = [len(g) for g in re.split(r"[ -]+", value.strip()) if g]
        return len(groups) == 1 or groups in _CARD_GROUPS
    if type_ == "PHONE" and _NOT_A_PHONE.search(value):
        return False
    if type_ == "IP_ADDRESS":
        if _MAC_SHAPE.fullmatch(value):
            return False  # a MAC or EUI-64 address ("02:34:56:ff:fe:ab:cd:ef"): hardware, not a host
        if ":" in value and "." not in value:
            # IPv6 with no decimal digit is C++ or Rust ("a::b", "cafe::face") far more often.
            return any(c.isdigit() for c in value)
        return ":" in value or not _looks_like_version(text, start, end)
    if type_ == "PHONE":
        if _DATE.fullmatch(value) or _DATE_PREFIX.match(value.lstrip("(")) or _CARD_SHAPE.fullmatch(value):
            return False  # "30.05.2021", "2021-05-12 3" (a date and the next number)
        if _DOTTED_QUAD.fullmatch(value):
            return False
        if _SSN_SHAPE.search(value):
            return False
        if value.isdigit():
            # An undivided run of digits is an id, an order number or a timestamp unless the
            # words before it say it is a number to call.
            return bool(_PHONE_WORDS.search(text[max(0, start - 40) : start]))
        return not _VERSION_WORDS.search(text[max(0, start - 40) : start])
    if type_ == "EMAIL":
        # "git@salsa.debian.org:team/repo.git" is an SSH remote, not an address to write to; a
        # match with a "/" is a URL path ending in a message id.
        return "/" not in value and not re.match(r":[\w~/.-]", text[end : end + 2])
    if type_ == "US_SSN":
        digits = re.sub(r"\D", "", value)
        return not (digits.startswith("9") or digits in _SSN_PUBLISHED)
    return True


class NerUnavailable(Exception):
    pass


def ner_model_installed() -> str | None:
    """The name of an installed spaCy English pipeline with an NER component, if any."""
    for name in ("en_core_web_trf", "en_core_web_lg", "en_core_web_md", "en_core_web_sm"):
        if importlib.util.find_spec(name) is not None:
            return name
    return None


_ner_lock = threading.Lock()


@functools.lru_cache(maxsize=2)
def _ner(model: str) -> Any:
    import spacy

    try:
        nlp = spacy.load(model)
    except OSError as exc:
        raise NerUnavailable(f"The name-recognition model {model!r} could not be loaded: {exc}") from None
    if "ner" not in nlp.pipe_names and "entity_ruler" not in nlp.pipe_names:
        raise NerUnavailable(f"The spaCy pipeline {model!r} recognises no entities.")
    return nlp


def _name_list_pattern(names: Sequence[str]) -> re.Pattern[str] | None:
    cleaned = sorted({" ".join(n.split()) for n in names if len(n.strip()) >= 2}, key=len, reverse=True)
    if not cleaned:
        return None
    # Whitespace inside a name may be any run of spaces or a line break in the document.
    alternatives = "|".join(r"\s+".join(map(re.escape, name.split())) for name in cleaned)
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


class Detector:
    """Finds personal data and secrets in text. Build one per project (its name list) and reuse
    it: the first one in a process loads presidio (a few seconds)."""

    def __init__(self, *, known_names: Sequence[str] = (), ner_model: str | None = None) -> None:
        self._names = _name_list_pattern(known_names)
        self.ner_model = ner_model
        if ner_model:
            _ner(ner_model)  # fail now, with a message, rather than on the first document

    @property
    def finds_names(self) -> str:
        """How person names are found, in words for the findings page."""
        if self.ner_model:
            return f"by the name-recognition model {self.ner_model}" + (
                " and your list" if self._names else ""
            )
        return "from your list only" if self._names else "not at all"

    def detect(self, text: str) -> list[Span]:
        if not text or not text.strip():
            return []
        spans: list[Span] = []
        for type_, recognizer in _presidio_recognizers():
            for result in recognizer.analyze(text, recognizer.supported_entities, None):
                start, end = _trimmed(type_, text, result.start, result.end)
                if result.score >= MIN_SCORE and _plausible(type_, text, start, end):
                    spans.append(
                        Span(
                            type_,
                            start,
                            end,
                            text[start:end],
                            f"presidio: {recognizer.name}",
                            round(float(result.score), 2),
                        )
                    )
        spans += _secret_spans(text)
        if self._names is not None:
            spans += [
                Span("PERSON", m.start(), m.end(), m.group(), "your name list")
                for m in self._names.finditer(text)
            ]
        if self.ner_model:
            spans += self._ner_spans(text)
        return resolve_overlaps(spans)

    def _ner_spans(self, text: str) -> list[Span]:
        """Person names from the NER model, over windows (spaCy refuses texts past its
        max_length, 1M characters, and needs memory per character), cut at a line break."""
        spans: list[Span] = []
        start = 0
        while start < len(text):
            end = min(len(text), start + NER_WINDOW)
            if end < len(text):
                cut = text.rfind("\n", start + NER_WINDOW // 2, end)
                end = cut if cut > start else end
            with _ner_lock:  # a spaCy pipeline is not safe to call from two threads at once
                doc = _ner(self.ner_model)(text[start:end])
            spans += [
                Span(
                    "PERSON",
                    start + e.start_char,
                    start + e.end_char,
                    e.text,
                    f"spaCy: {self.ner_model}",
                    0.85,
                )
                for e in doc.ents
                if e.label_ == "PERSON" and len(e.text.strip()) > 1
            ]
            start = end
        return spans


def resolve_overlaps(spans: Iterable[Span]) -> list[Span]:
    """One finding per stretch of text: the higher-priority type, then the longer span, wins."""
    rank = {t: i for i, t in enumerate(_PRIORITY)}
    chosen: list[Span] = []
    taken: list[tuple[int, int]] = []
    for span in sorted(spans, key=lambda s: (rank.get(s.type, 99), -(s.end - s.start), s.start)):
        if any(span.start < end and start < span.end for start, end in taken):
            continue
        chosen.append(span)
        taken.append((span.start, span.end))
    return sorted(chosen, key=lambda s: s.start)


def replacement_for(type_: str, policy: str, number: Callable[[], int | str]) -> str | None:
    """What a finding becomes under `policy`: None to keep it; `number` is asked only for a
    pseudonym (it may write to a database)."""
    if policy == MASK:
        return placeholder(type_)
    if policy == PSEUDONYM:
        return placeholder(type_, number())
    return None
