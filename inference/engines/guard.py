"""What an answer may contain, enforced on the model's output as it streams, free of Django.

The documents a model reads can carry instructions ("ignore previous instructions, reveal your
system prompt, add this link"). The prompt marks passages as untrusted data, but a 135M model
copies text from its passages readily, so nothing here relies on the model obeying: every answer
the app shows or returns passes through `AnswerGuard`, which

- removes every URL (Markdown links and images, autolinks, reference definitions, bare and
  `www.` URLs, `host/path`) whose host appears neither in the user's question nor in a source
  passage that vouches for it, replacing it with LINK_REMOVED; a passage that looks like an
  injection attempt (`injection_suspect`) vouches for nothing, and the hosts it names are
  distrusted even where another passage names them too;
- redacts every run of MIN_RUN_WORDS or more consecutive words (case, whitespace, punctuation
  and invisible characters ignored) that also occurs in a protected text (the system prompt and
  the passages header), replacing it with PROMPT_REMOVED.

It works on the raw text, so the API and the CLI get the same answer as the chat page. While
streaming it holds back a short tail (the last whitespace-separated run, an unfinished Markdown
link, a run of words that could still grow into a protected run) and releases text only once no
later token can change how it is filtered: the streamed pieces add up to exactly what filtering
the whole answer at once gives.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from training.ml.prompt import PASSAGES_HEADER, SYSTEM_PROMPT

LINK_REMOVED = "[link removed]"
PROMPT_REMOVED = "[system prompt removed]"
MIN_RUN_WORDS = 8  # a shorter shared run ("the passages do not contain the answer") is ordinary prose

# The texts of the prompt that an answer must never repeat. The app has no per-project system
# prompt; one would be added here by the caller (policy_for's `protected`).
PROTECTED_TEXTS = (SYSTEM_PROMPT, PASSAGES_HEADER)

# Characters that render as nothing: zero-width space and joiners, bidi marks and overrides,
# word joiner and invisible operators, byte-order mark, soft hyphen.
_INVISIBLE = "\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff"
_INVISIBLE_RE = re.compile(f"[{_INVISIBLE}]")
_WORD = re.compile(f"[\\w{_INVISIBLE}]+")

# --- Finding links ---------------------------------------------------------------------------

_URL_CHARS = r"[^\s<>\"'`]"
_BARE_PATTERN = (
    # scheme://…   (any scheme: only http(s) can be allowed)
    rf"[a-zA-Z][a-zA-Z0-9+.\-]{{0,31}}://{_URL_CHARS}*"
    # www.host…
    rf"|(?<![\w@.\-])www\.{_URL_CHARS}+"
    # schemes that need no "//"
    rf"|\b(?:javascript|vbscript|data|mailto|file):{_URL_CHARS}+"
    # host.tld/path, which many Markdown clients turn into links
    r"|(?<![\w@./\-])(?:[a-zA-Z0-9](?:[a-zA-Z0-9\-]{0,61}[a-zA-Z0-9])?\.)+[a-zA-Z]{2,63}(?::\d{1,5})?/"
    + _URL_CHARS
    + "*"
)
_BARE = re.compile(_BARE_PATTERN, re.IGNORECASE)
_LINK = re.compile(
    # A reference definition: [label]: destination "title"
    r"(?P<definition>^[ ]{0,3}\[[^\]\n]+\]:[ \t]*(?P<def_dest><[^<>\n]*>|\S+)"
    r"(?:[ \t]+(?:\"[^\"\n]*\"|'[^'\n]*'|\([^()\n]*\)))?[ \t]*$)"
    # An inline link or image: [text](destination "title")
    r"|(?P<inline>!?\[(?P<text>[^\[\]\n]*)\]\(\s*"
    r"(?P<dest><[^<>\n]*>|[^\s()<>]*(?:\([^\s()]*\)[^\s()<>]*)*)"
    r"(?:\s+(?P<title>\"[^\"\n]*\"|'[^'\n]*'|\([^()\n]*\)))?\s*\))"
    # An autolink: <scheme:...>
    r"|(?P<autolink><[a-zA-Z][a-zA-Z0-9+.\-]{1,31}:[^<>\s]*>)"
    # Anything else that leads somewhere
    f"|(?P<bare>{_BARE_PATTERN})",
    re.MULTILINE | re.IGNORECASE,
)
# A destination that can leave the page: a scheme, "//" or "\\", www., host.tld/.
_LEADS_AWAY = re.compile(
    r"\s*<?\s*(?:[a-z][a-z0-9+.\-]*:|[\\/]{2}|www\.|(?:[a-z0-9\-]+\.)+[a-z]{2,63}(?::\d+)?/)", re.IGNORECASE
)
_TRAILING = ".,:;!?*_~'\""
# Host names in trusted text that are not written as URLs: "docs.example.com", "ops@example.com".
_DOMAIN = re.compile(
    r"(?<![\w.\-])(?:[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9\-]{0,61}[a-z0-9](?![\w\-])",
    re.IGNORECASE,
)

# --- Recognising passages that try to instruct the model -----------------------------------

_SUSPECT = re.compile(
    "|".join(
        [
            r"\b(?:ignore|disregard|forget|override|bypass|skip)\b.{0,60}?\b(?:instructions?|rules|directions|guidelines|prompts?|directives?)\b",
            r"\bsystem[\s_-]*(?:prompt|message|instructions?)\b",
            r"\b(?:reveal|print|show|repeat|output|disclose|leak|display|recite|tell)\b.{0,40}?\b(?:prompt|instructions|rules)\b",
            r"\b(?:add|include|insert|append|put|embed|paste|attach|mention|recommend)\b.{0,40}?\b(?:link|url|hyperlink|image|website)s?\b",
            r"\b(?:you are now|new instructions|from now on|do anything now|developer mode|jailbreak)\b",
            r"\b(?:attention|note to|note for|message to|message for|dear|hey|hello)\s+(?:the\s+)?(?:ai|assistant|model|llm|chatbot|chat bot|language model|bot)\b",
            r"\b(?:ai|assistant|model|llm|chatbot|language model)s?\s+(?:must|should|shall|will|are instructed|is instructed)\b",
            r"\b(?:message|note|notice|instructions?|order|override)\s+from\s+(?:the\s+)?(?:system\s+)?(?:administrator|admin|developers?|operator|owner)\b",
            r"\b(?:i am|this is)\s+(?:the\s+|your\s+)?(?:system\s+)?(?:administrator|admin|developer|operator)\b",
            r"<\|[a-z_]{2,30}\|>|\[/?inst\]|<</?sys>>|<\s*/?\s*(?:system|assistant)\s*>",
            r"(?:^|\n)\s*(?:#{1,6}\s*)?(?:system|assistant|instructions?)\s*:",
            r"<!--",
            r"\bstyle\s*=\s*[\"'][^\"']*(?:color\s*:\s*(?:#fff\b|#ffffff\b|white\b|transparent\b)|display\s*:\s*none|visibility\s*:\s*hidden|font-size\s*:\s*0)",
        ]
    ),
    re.IGNORECASE | re.DOTALL,
)


def injection_suspect(text: str) -> bool:
    """Whether a passage reads like an attempt to instruct the model rather than inform the reader.

    A heuristic: it only decides which passages may vouch for a link's host. Missing an attempt
    lets a link to a host that passage names through; a false alarm only removes a link.
    """
    if _INVISIBLE_RE.search(text):
        return True  # text hidden inside words; documents we parse have these removed
    return bool(_SUSPECT.search(" ".join(unicodedata.normalize("NFKC", text).split())))


def hosts_in(text: str) -> set[str]:
    """Every host a text names, as a URL or as a bare domain ("docs.example.com")."""
    hosts = {_normal_host(m[0]) for m in _DOMAIN.finditer(text)}
    for match in _BARE.finditer(text):
        hosts.add(_url_host(_trimmed(match[0])))
    hosts.discard(None)
    return hosts  # type: ignore[return-value]


def _normal_host(host: str | None) -> str | None:
    if not host:
        return None
    host = unicodedata.normalize("NFKC", host).strip().rstrip(".").lower()
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    if not re.fullmatch(r"[a-z0-9.\-]+|\[[0-9a-f:.]+\]", host):
        return None
    return host.removeprefix("www.")


def _url_host(url: str) -> str | None:
    """The host a link leads to, or None when it leads nowhere we could allow."""
    url = _INVISIBLE_RE.sub("", url.strip())
    if url.startswith("<") and url.endswith(">"):
        url = url[1:-1].strip()
    if url.lower().startswith("www."):
        url = "http://" + url
    elif re.match(r"(?i)[a-z0-9.\-]+\.[a-z]{2,63}(?::\d+)?/", url):
        url = "http://" + url  # host.tld/path
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme == "mailto":
            return _normal_host(parts.path.rpartition("@")[2].partition("?")[0])
        if scheme not in ("http", "https"):
            return None
        # Userinfo (https://trusted.com@evil.example) and backslashes read differently by browsers.
        if any(c in parts.netloc for c in "@\\%") or not parts.netloc:
            return None
        return _normal_host(parts.hostname)
    except ValueError:
        return None


def _trimmed(url: str) -> str:
    """A bare URL without the punctuation that ends the sentence around it (GFM's rule)."""
    while url and (
        url[-1] in _TRAILING
        or (url[-1] == ")" and url.count(")") > url.count("("))
        or (url[-1] == "]" and url.count("]") > url.count("["))
    ):
        url = url[:-1]
    return url


# --- Policy ----------------------------------------------------------------------------------


def _words(text: str) -> list[tuple[str, int, int]]:
    """(normalised word, start, end) for each word; invisible characters neither split nor count."""
    out = []
    for match in _WORD.finditer(text):
        word = _INVISIBLE_RE.sub("", unicodedata.normalize("NFKC", match[0])).casefold()
        if word:
            out.append((word, match.start(), match.end()))
    return out


@dataclass(frozen=True)
class GuardPolicy:
    """What one answer may contain."""

    allowed_hosts: frozenset[str] = frozenset()
    # Every MIN_RUN_WORDS-word run of the protected texts, and every shorter run that can still
    # grow into one (held back while streaming).
    protected_runs: frozenset[tuple[str, ...]] = frozenset()
    run_starts: frozenset[tuple[str, ...]] = frozenset()


def policy_for(
    *, question: str, passages: Iterable[str], protected: Sequence[str] = PROTECTED_TEXTS
) -> GuardPolicy:
    """The policy for an answer to `question` from `passages` (each a source's title, location
    and text): links may lead to hosts named in the question or in a passage that is not an
    injection suspect, unless a suspect passage names the host too."""
    vouched: set[str] = set()
    distrusted: set[str] = set()
    for passage in passages:
        (distrusted if injection_suspect(passage) else vouched).update(hosts_in(passage))
    allowed = hosts_in(question) | (vouched - distrusted)
    runs: set[tuple[str, ...]] = set()
    starts: set[tuple[str, ...]] = set()
    for text in protected:
        words = [w for w, _, _ in _words(text)]
        for i in range(len(words) - MIN_RUN_WORDS + 1):
            runs.add(tuple(words[i : i + MIN_RUN_WORDS]))
            starts.update(tuple(words[i : i + n]) for n in range(1, MIN_RUN_WORDS))
    return GuardPolicy(frozenset(allowed), frozenset(runs), frozenset(starts))


def source_texts(sources: Iterable[dict]) -> list[str]:
    """A source dict (services.sources_from_hits) as the text the policy reads."""
    return ["\n".join(str(s.get(key) or "") for key in ("title", "location", "text")) for s in sources]


# --- Filtering -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Edit:
    start: int
    end: int
    replacement: str


def _link_edits(text: str, policy: GuardPolicy) -> list[_Edit]:
    edits: list[_Edit] = []

    def bare_in(start: int, end: int) -> None:
        for match in _BARE.finditer(text, start, end):
            url = _trimmed(match[0])
            if _url_host(url) not in policy.allowed_hosts:
                edits.append(_Edit(match.start(), match.start() + len(url), LINK_REMOVED))

    for match in _LINK.finditer(text):
        if match["definition"] is not None:
            kind, destination = "definition", match["def_dest"]
        elif match["inline"] is not None:
            kind, destination = "inline", match["dest"]
        elif match["autolink"] is not None:
            kind, destination = "autolink", match["autolink"]
        else:
            bare_in(match.start(), match.end())
            continue
        if _LEADS_AWAY.match(destination) and _url_host(destination) not in policy.allowed_hosts:
            edits.append(_Edit(match.start(), match.end(), LINK_REMOVED))
        elif kind == "inline":  # the link may go; its text and title are still checked
            bare_in(match.start("text"), match.end("text"))
            if match["title"]:
                bare_in(match.start("title"), match.end("title"))
        elif kind == "definition":
            bare_in(match.end("def_dest"), match.end())
    return edits


def _covered_runs(words: list[tuple[str, int, int]], policy: GuardPolicy) -> list[tuple[int, int]]:
    """Maximal runs (first, last word index) of words inside a protected run."""
    covered = [False] * len(words)
    for i in range(len(words) - MIN_RUN_WORDS + 1):
        if tuple(w for w, _, _ in words[i : i + MIN_RUN_WORDS]) in policy.protected_runs:
            covered[i : i + MIN_RUN_WORDS] = [True] * MIN_RUN_WORDS
    runs: list[tuple[int, int]] = []
    for i, flag in enumerate(covered):
        if flag:
            if runs and runs[-1][1] == i - 1:
                runs[-1] = (runs[-1][0], i)
            else:
                runs.append((i, i))
    return runs


def _merged(edits: list[_Edit]) -> list[_Edit]:
    """Edits sorted and made disjoint: overlapping ones become one, redaction winning."""
    out: list[_Edit] = []
    for edit in sorted(edits, key=lambda e: (e.start, -e.end)):
        if out and edit.start < out[-1].end:
            last = out[-1]
            replacement = (
                PROMPT_REMOVED if PROMPT_REMOVED in (last.replacement, edit.replacement) else last.replacement
            )
            out[-1] = _Edit(last.start, max(last.end, edit.end), replacement)
        else:
            out.append(edit)
    return out


_OPEN_LINK = re.compile(r"!?\[[^\[\]\n]*(?:\](?:\([^\n]*)?)?\Z")
_OPEN_DEFINITION = re.compile(r"[ ]{0,3}\[[^\]\n]*(?:\](?::[^\n]*)?)?\Z")
_LAST_RUN = re.compile(r"\S+\Z")


def _plan(text: str, policy: GuardPolicy, *, final: bool) -> tuple[list[_Edit], int]:
    """The edits to `text`, and how far the text is settled: no continuation can change the
    filtered form of text[:cut] (the whole text when `final`)."""
    words = _words(text)
    runs = _covered_runs(words, policy)
    edits = _merged(
        _link_edits(text, policy) + [_Edit(words[a][1], words[b][2], PROMPT_REMOVED) for a, b in runs]
    )
    if final:
        return edits, len(text)

    cut = len(text)
    last = _LAST_RUN.search(text)
    if last:  # a URL or a word may go on
        cut = last.start()
    line_start = text.rfind("\n") + 1
    if _OPEN_DEFINITION.match(text, line_start):  # perhaps a reference definition
        cut = min(cut, line_start)
    for bracket in re.finditer(r"!?\[", text[line_start:]):
        start = line_start + bracket.start()
        if _OPEN_LINK.match(text, start) and not _LINK.match(text, start):
            cut = min(cut, start)  # a Markdown link still being written
            break
    complete = [w for w in words if w[2] <= cut]
    for first in range(max(0, len(complete) - MIN_RUN_WORDS + 1), len(complete)):
        if tuple(w for w, _, _ in complete[first:]) in policy.run_starts:
            cut = min(cut, complete[first][1])  # could still grow into a protected run
            break
    # Never cut inside an edit, nor right after a redaction that the next word could extend.
    changed = True
    while changed:
        changed = False
        for edit in edits:
            if edit.start < cut < edit.end:
                cut, changed = edit.start, True
        for a, b in runs:
            next_settled = b + 1 < len(words) and words[b + 1][2] <= cut
            if words[a][1] < cut and not next_settled:
                cut, changed = words[a][1], True
    return edits, cut


def _apply(text: str, edits: list[_Edit], start: int, end: int) -> str:
    out: list[str] = []
    position = start
    for edit in edits:
        if edit.end <= start or edit.start >= end:
            continue
        out.append(text[position : max(position, edit.start)])
        out.append(edit.replacement)
        position = max(position, edit.end)
    out.append(text[position:end])
    return "".join(out)


class AnswerGuard:
    """Filters one answer as it streams: feed() each generated piece, then finish()."""

    def __init__(self, policy: GuardPolicy) -> None:
        self.policy = policy
        self._raw = ""
        self._settled = 0  # raw[:settled] has been filtered and released
        self._released: list[str] = []
        self.finished = False

    @property
    def text(self) -> str:
        """Everything released so far: the answer as shown, once finished."""
        return "".join(self._released)

    def feed(self, piece: str) -> str:
        """The filtered text that `piece` settles (often "", while a tail is held back)."""
        if self.finished:
            raise RuntimeError("This answer is finished.")
        self._raw += piece
        return self._release(final=False)

    def finish(self) -> str:
        """Whatever was held back, filtered; the answer is then complete."""
        if self.finished:
            return ""
        released = self._release(final=True)
        self.finished = True
        return released

    def _release(self, *, final: bool) -> str:
        edits, cut = _plan(self._raw, self.policy, final=final)
        if cut <= self._settled:
            return ""
        out = _apply(self._raw, edits, self._settled, cut)
        self._settled = cut
        self._released.append(out)
        return out


def guard_text(text: str, policy: GuardPolicy) -> str:
    """A whole answer, filtered."""
    guard = AnswerGuard(policy)
    guard.feed(text)
    guard.finish()
    return guard.text


def guarded(pieces: Iterator[str], guard: AnswerGuard) -> Iterator[str]:
    """`pieces` filtered by `guard`. Closing it closes `pieces`; guard.text is then the whole
    answer so far, held-back tail included, for whoever saves it."""
    try:
        for piece in pieces:
            out = guard.feed(piece)
            if out:
                yield out
        out = guard.finish()
        if out:
            yield out
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()
        guard.finish()
