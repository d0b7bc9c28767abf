"""PII and secrets detection (projects/pii.py) on real text: a labelled set, the unmodified Debian
FAQ, and throughput.

    cd /work/main && .venv/bin/python bench/pii_detection.py [--seed 11] [--samples 900]

1. Labelled set. Real paragraphs of the Debian FAQ (Debian package `debian-faq`, read with
   projects.parsing.parse_file, the parser the app scans uploads with), each with two or three
   generated values inserted between words at seeded random positions: positives of every type
   (cards valid by Luhn, IBANs with valid checksums for six countries, SSNs in issued ranges,
   phones valid for phonenumbers in ten countries and several formats, e-mails, IPv4/IPv6, AWS
   keys, GitHub/Slack/Stripe tokens, JWTs, private keys, URLs with a user:password, names from
   the list given to the detector) and look-alike negatives (16-digit numbers failing Luhn, IBANs
   with a wrong checksum, SSNs in never-issued ranges, version and section numbers, dates, order
   numbers, timestamps, commit hashes, UUIDs, C++ scopes, SSH remotes). Only paragraphs in which
   the detector finds nothing before insertion are used, so every finding in a sample is either
   an inserted positive or a false positive; what the detector finds in the FAQ itself is part 2.
   Scored per type: precision, recall and F1, for exact spans and for overlapping spans.
2. The unmodified FAQ: every finding with its context, reviewed by hand (REVIEWED below), and
   findings per 100k characters.
3. Throughput of Detector.detect on the FAQ (characters per second, median of repeats).

No Django settings are needed: projects.pii and projects.parsing are Django-free.
"""

from __future__ import annotations

import argparse
import base64
import json
import platform
import random
import re
import statistics
import string
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from projects import pii  # noqa: E402
from projects.parsing import parse_file  # noqa: E402

FAQ_DIR = Path("/usr/share/doc/debian/FAQ")
RESULTS_DIR = REPO_ROOT / "bench" / "results"
RESULT_NAME = "pii_detection"
MIN_PARAGRAPH_CHARS = 120

FIRST_NAMES = ["Maria", "Olusegun", "Chen", "Priya", "Lars", "Fatima", "Diego", "Anneke", "Tomasz", "Keiko"]
LAST_NAMES = [
    "Okafor",
    "Lindqvist",
    "Hernández",
    "Nakamura",
    "Kowalski",
    "Haddad",
    "Fitzgerald",
    "Van der Berg",
]
DOMAINS = ["example.com", "mail.example.org", "uni-heidelberg.de", "acme.co.uk", "correo.es", "firma.nl"]


# --------------------------------------------------------------------------------------------
# Generators: positives


def luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    for check in string.digits:
        if luhn_ok(body + check):
            return body + check
    raise AssertionError


def luhn_ok(number: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def group(number: str, sizes: list[int], sep: str) -> str:
    parts, i = [], 0
    for size in sizes:
        parts.append(number[i : i + size])
        i += size
    return sep.join(parts)


def card(rng: random.Random, *, valid: bool = True) -> str:
    kind = rng.choice(["visa", "mastercard", "amex", "discover"])
    prefix, length, sizes = {
        "visa": ("4", 16, [4, 4, 4, 4]),
        "mastercard": (str(rng.randint(51, 55)), 16, [4, 4, 4, 4]),
        "amex": (rng.choice(["34", "37"]), 15, [4, 6, 5]),
        "discover": ("6011", 16, [4, 4, 4, 4]),
    }[kind]
    number = luhn_complete(prefix, length, rng)
    if not valid:  # change the check digit: the Luhn sum is then wrong
        number = number[:-1] + str((int(number[-1]) + rng.randint(1, 9)) % 10)
    return rng.choice([number, group(number, sizes, " "), group(number, sizes, "-")])


IBAN_LAYOUTS = {  # country: the BBAN as (alphabet, count) runs
    "GB": [(string.ascii_uppercase, 4), (string.digits, 14)],
    "DE": [(string.digits, 18)],
    "FR": [(string.digits, 10), (string.ascii_uppercase + string.digits, 11), (string.digits, 2)],
    "NL": [(string.ascii_uppercase, 4), (string.digits, 10)],
    "ES": [(string.digits, 20)],
    "IT": [(string.ascii_uppercase, 1), (string.digits, 10), (string.ascii_uppercase + string.digits, 12)],
}


def iban_check(country: str, bban: str) -> str:
    moved = bban + country + "00"
    value = int("".join(str(int(c, 36)) for c in moved))
    return f"{98 - value % 97:02d}"


def iban(rng: random.Random, *, valid: bool = True) -> str:
    country = rng.choice(sorted(IBAN_LAYOUTS))
    bban = "".join(rng.choice(alphabet) for alphabet, n in IBAN_LAYOUTS[country] for _ in range(n))
    check = iban_check(country, bban)
    if not valid:
        check = f"{(int(check) + rng.randint(1, 90)) % 97 + 2:02d}"
        if check == iban_check(country, bban):
            check = f"{(int(check) + 1) % 97 + 2:02d}"
    value = country + check + bban
    return value if rng.random() < 0.5 else " ".join(value[i : i + 4] for i in range(0, len(value), 4))


def ssn(rng: random.Random, *, valid: bool = True) -> str:
    if valid:
        area = rng.choice([a for a in range(1, 900) if a != 666])
        group_, serial = rng.randint(1, 99), rng.randint(1, 9999)
    else:
        area, group_, serial = rng.choice(
            [(0, rng.randint(1, 99), rng.randint(1, 9999)), (666, 12, rng.randint(1, 9999)),
             (rng.randint(900, 999), rng.randint(1, 99), rng.randint(1, 9999)), (78, 5, 1120),
             (219, 9, 9999), (rng.randint(1, 899), 0, rng.randint(1, 9999)), (rng.randint(1, 899), 12, 0)]
        )  # fmt: skip
    sep = rng.choice(["-", "-", " "]) if valid else "-"
    return f"{area:03d}{sep}{group_:02d}{sep}{serial:04d}"


PHONE_REGIONS = ["US", "GB", "DE", "FR", "NL", "ES", "IT", "AU", "IN", "BR"]


def phone(rng: random.Random) -> str:
    import phonenumbers

    region = rng.choice(PHONE_REGIONS)
    kind = rng.choice([phonenumbers.PhoneNumberType.FIXED_LINE, phonenumbers.PhoneNumberType.MOBILE])
    example = phonenumbers.example_number_for_type(region, kind)
    national = str(example.national_number)
    for _ in range(100):  # vary the subscriber digits until phonenumbers says it is valid
        digits = national[:-4] + "".join(rng.choice(string.digits) for _ in range(4))
        number = phonenumbers.parse(digits, region)
        if phonenumbers.is_valid_number(number):
            break
    else:
        number = example
    style = rng.choice(["INTERNATIONAL", "INTERNATIONAL", "NATIONAL", "E164"])
    return phonenumbers.format_number(number, getattr(phonenumbers.PhoneNumberFormat, style))


def email(rng: random.Random) -> str:
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES).replace(" ", "")
    local = rng.choice([f"{first}.{last}", f"{first[0]}{last}", f"{first}_{rng.randint(1, 99)}", first])
    local = local.encode("ascii", "ignore").decode().lower() if rng.random() < 0.7 else local
    return f"{local.encode('ascii', 'ignore').decode()}@{rng.choice(DOMAINS)}"


def ip_address(rng: random.Random) -> str:
    import ipaddress

    if rng.random() < 0.6:
        return ".".join(str(rng.randint(1, 254)) for _ in range(4))
    value = ipaddress.IPv6Address(rng.getrandbits(128))
    if rng.random() < 0.5:  # a routed-looking address with zeros, so it compresses
        value = ipaddress.IPv6Address((0x20010DB8 << 96) | rng.getrandbits(32))
    return value.compressed if rng.random() < 0.7 else value.exploded


def alnum(rng: random.Random, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def secret(rng: random.Random) -> str:
    kind = rng.choice(["aws", "github", "slack", "stripe", "jwt", "private_key"])
    if kind == "aws":
        return rng.choice(["AKIA", "ASIA"]) + alnum(rng, 16, string.ascii_uppercase + string.digits)
    if kind == "github":
        return rng.choice(["ghp_", "gho_", "ghs_"]) + alnum(rng, 36)
    if kind == "slack":
        return f"xoxb-{alnum(rng, 12, string.digits)}-{alnum(rng, 13, string.digits)}-{alnum(rng, 24)}"
    if kind == "stripe":
        return rng.choice(["sk_live_", "rk_live_"]) + alnum(rng, 24)
    if kind == "jwt":
        header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = b64url(
            json.dumps({"sub": str(rng.randint(1, 10**9)), "iat": rng.randint(10**9, 2 * 10**9)}).encode()
        )
        return f"{header}.{payload}.{b64url(rng.randbytes(32))}"
    body = base64.b64encode(rng.randbytes(rng.choice([96, 144]))).decode()
    lines = "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    label = rng.choice(["RSA PRIVATE KEY", "PRIVATE KEY", "OPENSSH PRIVATE KEY", "EC PRIVATE KEY"])
    return f"-----BEGIN {label}-----\n{lines}\n-----END {label}-----"


def url_with_credentials(rng: random.Random) -> tuple[str, list[tuple[str, int, int]]]:
    """The URL, and its gold spans: the user:password part, and the host when it is an IP address."""
    scheme = rng.choice(["https", "http", "postgres", "mysql", "redis", "ftp", "amqp"])
    userinfo = (
        f"{rng.choice(['admin', 'deploy', 'svc_build', 'root', 'alice'])}:{alnum(rng, rng.randint(8, 20))}"
    )
    host = rng.choice(
        ["db.internal.example.org", "10.2.3.4:5432", "cache.example.com:6379", "ftp.example.net"]
    )
    url = f"{scheme}://{userinfo}@{host}/{rng.choice(['app', 'pub/files', '0', 'vhost'])}"
    start = len(scheme) + 3
    gold = [("URL_CREDENTIALS", start, start + len(userinfo))]
    if host[0].isdigit():
        host_start = start + len(userinfo) + 1
        gold.append(("IP_ADDRESS", host_start, host_start + len(host.split(":")[0])))
    return url, gold


def known_names(rng: random.Random) -> list[str]:
    return sorted({f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}" for _ in range(40)})


# --------------------------------------------------------------------------------------------
# Generators: look-alikes (each says what it might be taken for)


def negative(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(
        ["card_luhn_fails", "iban_bad_checksum", "ssn_invalid_range", "version_number", "section_number",
         "date", "order_number", "timestamp", "commit_hash", "uuid", "cpp_scope", "ssh_remote", "isbn"]
    )  # fmt: skip
    if kind == "card_luhn_fails":
        return kind, card(rng, valid=False)
    if kind == "iban_bad_checksum":
        return kind, iban(rng, valid=False)
    if kind == "ssn_invalid_range":
        return kind, ssn(rng, valid=False)
    if kind == "version_number":
        v = ".".join(str(rng.randint(0, 30)) for _ in range(4))
        return kind, rng.choice(
            [f"version {v}", f"release {v}", f"libfoo-{v}", f"{v}-rc1", f"v{v}", f"{v}+dfsg"]
        )
    if kind == "section_number":
        v = ".".join(str(rng.randint(1, 20)) for _ in range(4))
        return kind, rng.choice([f"Section {v}", f"see section {v}", f"chapter {v}"])
    if kind == "date":
        d, m, y = rng.randint(1, 28), rng.randint(1, 12), rng.randint(1995, 2030)
        return kind, rng.choice(
            [f"{d:02d}.{m:02d}.{y}", f"{m:02d}/{d:02d}/{y}", f"{y}-{m:02d}-{d:02d}", f"{d}.{m}.{y}"]
        )
    if kind == "order_number":
        return kind, rng.choice(["order ", "ticket #", "invoice no. ", "bug #"]) + alnum(
            rng, 10, string.digits
        )
    if kind == "timestamp":
        return kind, str(rng.randint(1_000_000_000, 1_999_999_999))
    if kind == "commit_hash":
        return kind, alnum(rng, rng.choice([40, 64]), "0123456789abcdef")
    if kind == "uuid":
        import uuid

        return kind, str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "cpp_scope":
        return kind, rng.choice(["std::vector", "a::b", "cafe::face", "Foo::bar::baz", "dead::beef"])
    if kind == "ssh_remote":
        return (
            kind,
            f"git@{rng.choice(['salsa.debian.org', 'github.com'])}:{rng.choice(['team', 'me'])}/repo.git",
        )
    return (
        kind,
        f"ISBN 978-{rng.randint(0, 9)}-{rng.randint(10, 99)}-{rng.randint(100000, 999999)}-{rng.randint(0, 9)}",
    )


# --------------------------------------------------------------------------------------------
# The labelled set


@dataclass
class Gold:
    type: str
    start: int
    end: int
    text: str


@dataclass
class Sample:
    text: str
    gold: list[Gold]
    negatives: list[tuple[str, int, int, str]]  # (kind, start, end, text)


def carrier(type_: str, value: str, rng: random.Random) -> tuple[str, int]:
    """The inserted phrase and where the value starts in it. Phrases are neutral: they do not say
    what the value is (except for phones, one in three times, as documents often do)."""
    if type_ == "PHONE" and rng.random() < 0.33:
        prefix = rng.choice(["call ", "phone: ", "Tel. ", "mobile "])
    else:
        prefix = rng.choice(["", "", "(", "see ", "use ", "- "])
    suffix = ")" if prefix == "(" else rng.choice(["", "", ",", "."])
    if "\n" in value:  # a private key goes on lines of its own
        prefix, suffix = "\n", "\n"
    return prefix + value + suffix, len(prefix)


def make_positive(type_: str, rng: random.Random, names: list[str]) -> tuple[str, list[tuple[str, int, int]]]:
    """A value of `type_`, and the gold spans within it."""
    if type_ == "URL_CREDENTIALS":
        return url_with_credentials(rng)
    value = {
        "CREDIT_CARD": card,
        "IBAN": iban,
        "US_SSN": ssn,
        "PHONE": phone,
        "EMAIL": email,
        "IP_ADDRESS": ip_address,
        "SECRET": secret,
        "PERSON": lambda r: names_variant(r.choice(names), r),
    }[type_](rng)
    return value, [(type_, 0, len(value))]


def names_variant(name: str, rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.15:
        return name.upper()
    if roll < 0.3:
        return name.lower()
    if roll < 0.45:
        return name.replace(" ", "\n", 1)  # wrapped at a line end
    return name


def paragraphs(texts: list[str]) -> list[str]:
    out = []
    for text in texts:
        for block in re.split(r"\n\s*\n", text):
            block = block.strip()
            if len(block) >= MIN_PARAGRAPH_CHARS and not block.startswith("#") and block.count(" ") > 15:
                out.append(block)
    return out


def build_samples(
    rng: random.Random, clean: list[str], names: list[str], n: int, types: list[str]
) -> list[Sample]:
    samples = []
    for i in range(n):
        base = rng.choice(clean)
        # Each sample: one or two positives (types in turn, so every type gets its share) and one
        # look-alike, at distinct word gaps.
        # (phrase, [(label, start, end) within the phrase]); a label "neg:<kind>" is a look-alike
        inserts: list[tuple[str, list[tuple[str, int, int]]]] = []
        for j in range(1 + (i % 2)):
            type_ = types[(i + j * 5) % len(types)]
            value, spans = make_positive(type_, rng, names)
            phrase, at = carrier(type_, value, rng)
            inserts.append((phrase, [(t, at + g0, at + g1) for t, g0, g1 in spans]))
        kind, value = negative(rng)
        phrase, at = carrier("", value, rng)
        inserts.append((phrase, [(f"neg:{kind}", at, at + len(value))]))
        gaps = [m.start() for m in re.finditer(r" (?=\S)", base)]
        positions = sorted(rng.sample(gaps, len(inserts)))
        rng.shuffle(inserts)
        text, gold, negs, cursor = "", [], [], 0
        for (phrase, spans), pos in zip(inserts, positions, strict=True):
            text += base[cursor:pos] + " "
            offset = len(text)
            text += phrase
            cursor = pos
            for label, v0, v1 in spans:
                if label.startswith("neg:"):
                    negs.append((label[4:], offset + v0, offset + v1, phrase[v0:v1]))
                else:
                    gold.append(Gold(label, offset + v0, offset + v1, phrase[v0:v1]))
        text += base[cursor:]
        samples.append(Sample(text, gold, negs))
    return samples


# --------------------------------------------------------------------------------------------
# Scoring


def overlaps(a0: int, a1: int, b0: int, b1: int) -> bool:
    return a0 < b1 and b0 < a1


def score(samples: list[Sample], detector: pii.Detector) -> dict[str, Any]:
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    misses, false_positives, cut_wrong = [], [], []
    negatives_hit: Counter[str] = Counter()
    negatives_seen: Counter[str] = Counter()
    for sample in samples:
        found = detector.detect(sample.text)
        for g in sample.gold:
            counts[g.type]["gold"] += 1
            same_type = [s for s in found if s.type == g.type and overlaps(s.start, s.end, g.start, g.end)]
            if any(s.start == g.start and s.end == g.end for s in same_type):
                counts[g.type]["recall_exact"] += 1
            if same_type:
                counts[g.type]["recall_overlap"] += 1
                if not any(s.start == g.start and s.end == g.end for s in same_type):
                    cut_wrong.append({"type": g.type, "gold": g.text, "found": [s.text for s in same_type]})
            else:
                other = [f"{s.type}: {s.text}" for s in found if overlaps(s.start, s.end, g.start, g.end)]
                context = " ".join(sample.text[max(0, g.start - 40) : g.end + 30].split())
                misses.append({"type": g.type, "text": g.text, "found_instead": other, "context": context})
        for kind, n0, n1, _ in sample.negatives:
            negatives_seen[kind] += 1
            if any(overlaps(s.start, s.end, n0, n1) for s in found):
                negatives_hit[kind] += 1
        for s in found:
            counts[s.type]["predicted"] += 1
            gold_same = [
                g for g in sample.gold if g.type == s.type and overlaps(s.start, s.end, g.start, g.end)
            ]
            if any(g.start == s.start and g.end == s.end for g in gold_same):
                counts[s.type]["precision_exact"] += 1
            if gold_same:
                counts[s.type]["precision_overlap"] += 1
            else:
                neg = [k for k, n0, n1, _ in sample.negatives if overlaps(s.start, s.end, n0, n1)]
                context = sample.text[max(0, s.start - 30) : s.end + 30].replace("\n", " ")
                false_positives.append(
                    {"type": s.type, "text": s.text, "lookalike": neg[0] if neg else None, "context": context}
                )
    per_type = {}
    for type_ in pii.TYPES:
        c = counts[type_]
        row: dict[str, Any] = {"gold": c["gold"], "predicted": c["predicted"]}
        for match in ("exact", "overlap"):
            p = c[f"precision_{match}"] / c["predicted"] if c["predicted"] else 1.0
            r = c[f"recall_{match}"] / c["gold"] if c["gold"] else 1.0
            row[match] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}
        per_type[type_] = row
    total = {k: sum(counts[t][k] for t in pii.TYPES) for k in ("gold", "predicted")}
    micro = {}
    for match in ("exact", "overlap"):
        p = sum(counts[t][f"precision_{match}"] for t in pii.TYPES) / max(total["predicted"], 1)
        r = sum(counts[t][f"recall_{match}"] for t in pii.TYPES) / max(total["gold"], 1)
        micro[match] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}
    return {
        "per_type": per_type,
        "micro": {**total, **micro},
        "lookalikes": {
            k: {"inserted": negatives_seen[k], "flagged": negatives_hit[k]} for k in sorted(negatives_seen)
        },
        "misses": misses,
        "cut_wrong": cut_wrong,
        "false_positives": false_positives,
    }


# --------------------------------------------------------------------------------------------
# The unmodified FAQ

# Every finding on the unmodified FAQ, reviewed by hand: (type, text) -> (verdict, why).
# A finding not listed here is reported as "unreviewed", so a change in the detector shows up.
REVIEWED: dict[tuple[str, str], tuple[str, str]] = {
    ("EMAIL", "debian-user@lists.debian.org"): ("real", "a mailing list's address"),
    ("EMAIL", "debian-admin@lists.debian.org"): ("real", "a team's address"),
    ("EMAIL", "doc-debian@packages.debian.org"): ("real", "the FAQ package's maintainer address"),
    ("EMAIL", "sanvila@debian.org"): ("real", "a person's address (a package's Maintainer field)"),
    ("EMAIL", "debian-list-subject-request@lists.debian.org"): (
        "real (template)", "a pattern for list addresses, but a well-formed address"),
    ("EMAIL", "listmaster@lists.debian.org"): ("real", "a role address"),
    ("EMAIL", "xyz@packages.debian.org"): ("real (template)", "a pattern: xyz stands for a package name"),
    ("EMAIL", "request@bugs.debian.org"): ("real", "the bug tracker's request address"),
    ("EMAIL", "debian-list-subject-REQUEST@lists.debian.org"): (
        "real (template)", "a pattern for list addresses, but a well-formed address"),
}  # fmt: skip


def faq_texts() -> list[tuple[str, str]]:
    import warnings

    from bs4 import XMLParsedAsHTMLWarning

    warnings.simplefilter("ignore", XMLParsedAsHTMLWarning)  # the FAQ pages are XHTML
    files = sorted(FAQ_DIR.glob("*.en.html"))
    if not files:
        raise SystemExit(
            f"The Debian FAQ is not installed: no {FAQ_DIR}/*.en.html. Install it with: apt-get install debian-faq"
        )
    return [(p.name, parse_file(p, p.name).text) for p in files]


def scan_faq(detector: pii.Detector, pages: list[tuple[str, str]]) -> dict[str, Any]:
    findings = []
    for name, text in pages:
        for s in detector.detect(text):
            verdict, why = REVIEWED.get((s.type, s.text), ("unreviewed", ""))
            findings.append(
                {
                    "page": name,
                    "type": s.type,
                    "text": s.text,
                    "detector": s.detector,
                    "verdict": verdict,
                    "why": why,
                    "context": " ".join(text[max(0, s.start - 50) : s.end + 50].split()),
                }
            )
    chars = sum(len(t) for _, t in pages)
    false_pos = [f for f in findings if not f["verdict"].startswith("real")]
    return {
        "pages": len(pages),
        "characters": chars,
        "findings": findings,
        "per_type": dict(Counter(f["type"] for f in findings)),
        "findings_per_100k_chars": len(findings) / chars * 100_000,
        "not_real_per_100k_chars": len(false_pos) / chars * 100_000,
    }


def throughput(detector: pii.Detector, pages: list[tuple[str, str]], repeats: int) -> dict[str, Any]:
    chars = sum(len(t) for _, t in pages)
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _, text in pages:
            detector.detect(text)
        runs.append(time.perf_counter() - started)
    return {
        "characters": chars,
        "repeats": repeats,
        "seconds": runs,
        "chars_per_second_median": chars / statistics.median(runs),
    }


# --------------------------------------------------------------------------------------------
# Report


def report(result: dict[str, Any]) -> list[str]:
    lines = [f"PII detection, projects/pii.py ({result['when']}, seed {result['seed']})", ""]
    lab = result["labelled"]
    lines.append(
        f"1. Labelled set: {lab['samples']} samples from {lab['clean_paragraphs']} FAQ paragraphs, "
        f"{lab['micro']['gold']} inserted values, {sum(v['inserted'] for v in lab['lookalikes'].values())} look-alikes"
    )
    lines.append(f"   {'type':16} {'gold':>5} {'found':>5}   exact P/R/F1          overlap P/R/F1")
    for type_, row in lab["per_type"].items():
        e, o = row["exact"], row["overlap"]
        lines.append(
            f"   {type_:16} {row['gold']:5d} {row['predicted']:5d}   "
            f"{e['precision']:.3f} {e['recall']:.3f} {e['f1']:.3f}     {o['precision']:.3f} {o['recall']:.3f} {o['f1']:.3f}"
        )
    e, o = lab["micro"]["exact"], lab["micro"]["overlap"]
    lines.append(
        f"   {'all (micro)':16} {lab['micro']['gold']:5d} {lab['micro']['predicted']:5d}   "
        f"{e['precision']:.3f} {e['recall']:.3f} {e['f1']:.3f}     {o['precision']:.3f} {o['recall']:.3f} {o['f1']:.3f}"
    )
    lines += ["", "   look-alikes flagged (any type) / inserted:"]
    lines += [f"     {k:20} {v['flagged']:3d} / {v['inserted']}" for k, v in lab["lookalikes"].items()]
    lines += ["", f"   misses ({len(lab['misses'])}):"]
    lines += [
        f"     {m['type']:16} {m['text']!r}  found instead: {m['found_instead']}  | {m['context']!r}"
        for m in lab["misses"]
    ]
    lines += ["", f"   spans cut wrong ({len(lab['cut_wrong'])}):"]
    lines += [f"     {m['type']:16} gold {m['gold']!r}  found {m['found']}" for m in lab["cut_wrong"]]
    lines += ["", f"   false positives ({len(lab['false_positives'])}):"]
    lines += [
        f"     {f['type']:16} {f['text']!r}  look-alike: {f['lookalike']}  | {f['context']!r}"
        for f in lab["false_positives"]
    ]
    if result["other_seeds"]:
        lines += ["", "   the same, other seeds (all types, micro):"]
        for seed, other in result["other_seeds"].items():
            e = other["micro"]["exact"]
            lines.append(
                f"     seed {seed}: {other['micro']['gold']} values, exact P {e['precision']:.3f} R {e['recall']:.3f} "
                f"F1 {e['f1']:.3f}; {len(other['misses'])} misses, {len(other['cut_wrong'])} cut wrong, "
                f"{len(other['false_positives'])} false positives"
            )
            lines += [f"       miss {m['type']} {m['text']!r} | {m['context']!r}" for m in other["misses"]]
            lines += [
                f"       cut  {m['type']} gold {m['gold']!r} found {m['found']}" for m in other["cut_wrong"]
            ]
            lines += [
                f"       FP   {f['type']} {f['text']!r} ({f['lookalike']}) | {f['context']!r}"
                for f in other["false_positives"]
            ]
    faq = result["faq"]
    lines += [
        "",
        f"2. Unmodified Debian FAQ: {faq['pages']} pages, {faq['characters']} characters, "
        f"{len(faq['findings'])} findings = {faq['findings_per_100k_chars']:.1f} per 100k characters "
        f"(not real: {faq['not_real_per_100k_chars']:.1f} per 100k)",
    ]
    lines += [
        f"   {f['page']:22} {f['type']:10} {f['text']!r:48} {f['verdict']}: {f['why']}\n"
        f"   {'':22} | {f['context']}"
        for f in faq["findings"]
    ]
    t = result["throughput"]
    lines += [
        "",
        f"3. Throughput: {t['chars_per_second_median']:,.0f} characters/s (median of {t['repeats']} passes over "
        f"{t['characters']} characters; first-use load {result['load_seconds']:.1f} s, not included)",
    ]
    return lines


def clean_for(detector: pii.Detector, paragraphs_: list[str]) -> list[str]:
    """The paragraphs in which the detector finds nothing before insertion."""
    return [p for p in paragraphs_ if not detector.detect(p)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--samples", type=int, default=900)
    parser.add_argument("--repeats", type=int, default=5, help="passes over the FAQ for throughput")
    parser.add_argument(
        "--other-seeds",
        type=int,
        nargs="*",
        default=[12, 13, 14, 15, 16],
        help="further labelled sets, summarised (the look-alike rules were tuned on seed 11 and 12-13)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    pages = faq_texts()
    rng = random.Random(args.seed)
    names = known_names(rng)
    started = time.perf_counter()
    detector = pii.Detector(known_names=names)
    detector.detect("warm up: a@example.com 10.0.0.1")
    load_seconds = time.perf_counter() - started

    all_paragraphs = paragraphs([t for _, t in pages])
    clean = clean_for(detector, all_paragraphs)
    types = list(pii.TYPES)
    samples = build_samples(rng, clean, names, args.samples, types)
    labelled = score(samples, detector)
    labelled.update(samples=len(samples), paragraphs=len(all_paragraphs), clean_paragraphs=len(clean))

    other_seeds = {}
    for seed in args.other_seeds:
        other_rng = random.Random(seed)
        other_names = known_names(other_rng)
        other_detector = pii.Detector(known_names=other_names)
        other = score(
            build_samples(
                other_rng, clean_for(other_detector, all_paragraphs), other_names, args.samples, types
            ),
            other_detector,
        )
        other_seeds[str(seed)] = {
            "micro": other["micro"],
            "misses": other["misses"],
            "cut_wrong": other["cut_wrong"],
            "false_positives": other["false_positives"],
        }

    result: dict[str, Any] = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seed": args.seed,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            n: metadata.version(n) for n in ("presidio-analyzer", "phonenumbers", "detect-secrets", "spacy")
        },
        "load_seconds": load_seconds,
        "labelled": labelled,
        "other_seeds": other_seeds,
        "faq": scan_faq(detector, pages),
        "throughput": throughput(detector, pages, args.repeats),
        "examples": [asdict(g) for s in samples[:3] for g in s.gold],
    }
    printed = report(result)
    print("\n".join(printed))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{RESULT_NAME}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (args.out / f"{RESULT_NAME}.txt").write_text("\n".join(printed) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
