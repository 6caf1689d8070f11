"""Stage 3, filter: FineWeb's filters in FineWeb's order, with its published default thresholds.

URL blocklist -> language ID -> Gopher repetition -> Gopher quality -> C4 -> FineWeb rules, then
optional e-mail/IP masking. Every filter is a score function plus rules, checked by one
mechanism: a rule is (name, score, bound, threshold). Scores are computed for every document
and kept as columns, kept or dropped, so "why was this dropped" is answered from data; the
reason is the first rule that failed, in order, as ``<filter>:<rule>`` (for example
``gopher_quality:min_alpha_words_ratio``). C4 also removes lines (javascript, policy phrases,
lines of fewer than 3 words); the filters after it see the cleaned text, as in datatrove.
"""

from __future__ import annotations

import ipaddress
import re
import string
import time
import unicodedata
from bisect import bisect_left
from collections import Counter
from functools import cache
from itertools import chain, compress
from operator import add, ne
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from tasks.config import FilterConfig
from tasks.extract import DOC_SCHEMA
from tasks.shards import StageWriter, iter_rows, with_fields
from tasks.stage import stage_dir, stage_task
from tasks.workers import DaskShards, batched, in_order, pool_extra, shard_pool

PARAGRAPH_RE = re.compile(r"\n{2,}")
LINE_RUNS_RE = re.compile(r"\n+")   # Gopher's lines: a run of newlines is one break (blank lines are no lines)
BULLETS = ("•", "-")   # the bullets Gopher's rule counts, as in datatrove
BATCH = 64             # documents per shard of work (~1 s): enough shards to keep every worker busy
DASK_BATCH = 128       # per Prefect task on Dask, where each one costs a few API calls

# Sentence-ending characters (Unicode's sentence terminals, the set datatrove's FineWeb rules use):
# a line "ends in terminal punctuation" when its last character is one of them.
TERMINAL = frozenset(
    "!.?\u0589\u061d\u061e\u061f\u06d4\u0700\u0701\u0702\u07f9\u0837\u0839\u083d\u083e\u0964\u0965\u104a\u104b"
    "\u1362\u1367\u1368\u166e\u1735\u1736\u17d4\u17d5\u17d6\u17d9\u17da\u1803\u1809\u1944\u1945\u1aa8\u1aa9\u1aaa"
    "\u1aab\u1b5a\u1b5b\u1b5e\u1b5f\u1b7d\u1b7e\u1c3b\u1c3c\u1c7e\u1c7f\u203c\u203d\u2047\u2048\u2049\u2e2e\u2e3c"
    "\u2e53\u2e54\u3002\ua4ff\ua60e\ua60f\ua6f3\ua6f7\ua876\ua877\ua8ce\ua8cf\ua92f\ua9c8\ua9c9\uaa5d\uaa5e\uaa5f"
    "\uaaf0\uaaf1\uabeb\ufe52\ufe56\ufe57\uff01\uff0e\uff1f\uff61\U00010a56\U00010a57\U00010f55\U00010f56\U00010f57"
    "\U00010f58\U00010f59\U00010f86\U00010f87\U00010f88\U00010f89\U00011047\U00011048\U000110be\U000110bf\U000110c0"
    "\U000110c1\U00011141\U00011142\U00011143\U000111c5\U000111c6\U000111cd\U000111de\U000111df\U00011238\U00011239"
    "\U0001123b\U0001123c\U000112a9\U0001144b\U0001144c\U000115c2\U000115c3\U000115c9\U000115ca\U000115cb\U000115cc"
    "\U000115cd\U000115ce\U000115cf\U000115d0\U000115d1\U000115d2\U000115d3\U000115d4\U000115d5\U000115d6\U000115d7"
    "\U00011641\U00011642\U0001173c\U0001173d\U0001173e\U00011944\U00011946\U00011a42\U00011a43\U00011a9b\U00011a9c"
    "\U00011c41\U00011c42\U00011ef7\U00011ef8\U00011f43\U00011f44\U00016a6e\U00016a6f\U00016af5\U00016b37\U00016b38"
    "\U00016b44\U00016e98\U0001bc9f\U0001da88")
# What Gopher's quality rules count as punctuation (a word made only of these is not a word): ASCII
# punctuation, control characters but tab and newline, typographic and CJK marks, and the sentence
# terminals, as datatrove lists them ("•" and "‘" are not in it, "１" is).
PUNCTUATION = frozenset(string.punctuation + "".join(map(chr, [*range(0, 9), 11, 12, *range(13, 32), *range(127, 160)]))
                        + "—”％１〈、━【「」，】；“《„’∶´．（–？！：～«〉》）。…►»") | TERMINAL


# --- words, as datatrove splits them ---------------------------------------------------------
# datatrove's Gopher and FineWeb rules count words with its word tokenizer for the document's
# language; for English (FineWeb's setting) that is spaCy's blank English tokenizer. Its rules,
# written here over Python's re: the text is cut at whitespace; a piece that is a special case
# (a contraction, an abbreviation, an emoticon) is split as listed; otherwise punctuation,
# quotes, currency signs and symbols are cut off its start (prefixes) and its end (suffixes) one
# at a time, until none is left or what is left is a special case; what is left is then split at
# infixes (hyphens and slashes between letters, a period between a lower and an upper case letter,
# runs of dots...) unless it is a URL. So "email.errors", "e.g." and "don't" are one, one and two
# words, as in datatrove. spaCy names scripts where this uses Unicode categories (letters, lower
# and upper case, symbols): the two differ only on scripts spaCy does not list and on symbols
# added to Unicode after its list was written.

HYPHENS = ("-", "–", "—", "--", "---", "——", "~")
PUNCT = ("…", "……", ",", ":", ";", "!", "?", "¿", "؟", "¡", "(", ")", "[", "]", "{", "}", "<", ">", "_", "#",
         "*", "&", "。", "？", "！", "，", "、", "；", "：", "～", "·", "।", "،", "۔", "؛", "٪")
QUOTES = tuple("'\"”“`‘´’‚,„»«「」『』（）〔〕【】《》〈〉\u2329\u232a⟦⟧")
CURRENCY = ("$", "£", "€", "¥", "฿", "US$", "C$", "A$", "₽", "﷼", *map(chr, range(0x20a0, 0x20c0)))
UNITS = ("km km² km³ m m² m³ dm dm² dm³ cm cm² cm³ mm mm² mm³ ha µm nm yd in ft kg g mg µg t lb oz m/s km/h kmh "
         "mph hPa Pa mbar mb MB kb KB gb GB tb TB T G M K % км км² км³ м м² м³ дм дм² дм³ см см² см³ мм мм² мм³ нм "
         "кг г мг м/с км/ч кПа Па мбар Кб КБ кб Мб МБ мб Гб ГБ гб Тб ТБ тбكم كم² كم³ م م² م³ سم سم² سم³ مم مم² "
         "مم³ كم غرام جرام جم كغ ملغ كوب اكواب").split()
EMOTICONS = r"""
:) :-) :)) :-)) :))) :-))) (: (-: =) (= :] :-] [: [-: [= =] :o) (o: :} :-} 8) 8-) (-8 ;) ;-) (; (-; :( :-(
:(( :-(( :((( :-((( ): )-: =( >:( :') :'-) :'( :'-( :/ :-/ =/ =| :| :-| ]= =[ :1 :P :-P :p :-p :O :-O :o
:-o :0 :-0 :() >:o :* :-* :3 :-3 =3 :> :-> :X :-X :x :-x :D :-D ;D ;-D =D xD XD xDD XDD 8D 8-D ^_^ ^__^
^___^ >.< >.> <.< ._. ;_; -_- -__- v.v V.V v_v V_V o_o o_O O_o O_O 0_o o_0 0_0 o.O O.o O.O o.o 0.0 o.0 0.o
@_@ <3 <33 <333 </3 (^_^) (-_-) (._.) (>_<) (*_*) (¬_¬) ಠ_ಠ ಠ︵ಠ (ಠ_ಠ) ¯\(ツ)/¯ (╯°□°）╯︵┻━┻ ><(((*>""".split()
ABBREVIATIONS = """
'd a.m. Adm. Bros. co. Co. Corp. D.C. Dr. e.g. E.g. E.G. Gen. Gov. i.e. I.e. I.E. Inc. Jr. Ltd. Md. Messrs. Mo.
Mont. Mr. Mrs. Ms. p.m. Ph.D. Prof. Rep. Rev. Sen. St. vs. v.s. Mt. Ak. Ala. Apr. Ariz. Ark. Aug. Calif. Colo.
Conn. Dec. Del. Feb. Fla. Ga. Ia. Id. Ill. Ind. Jan. Jul. Jun. Kan. Kans. Ky. La. Mar. Mass. Mich. Minn. Miss.
N.C. N.D. N.H. N.J. N.M. N.Y. Neb. Nebr. Nev. Nov. Oct. Okla. Ore. Pa. S.C. Sep. Sept. Tenn. Va. Wash. Wis.
'S 's ‘S ‘s and/or w/o 're 'Cause 'cause 'cos 'Cos 'coz 'Coz 'cuz 'Cuz 'bout ma'am Ma'am o'clock O'clock
lovin' Lovin' lovin Lovin havin' Havin' havin Havin doin' Doin' doin Doin goin' Goin' goin Goin nothin nothin'
Nothin Nothin' nuthin nuthin' Nuthin Nuthin' ol ol' Ol Ol' somethin somethin' Somethin Somethin' em 'em ll 'll
nuff 'nuff ' '' C++ <space> \\t \\n \\") \u2014""".split()


def _special_cases() -> dict[str, tuple[str, ...]]:
    """English special cases: each maps a whole piece of text to its words."""
    exc: dict[str, tuple[str, ...]] = {}

    def both(*parts: str) -> None:   # as written and with its first word capitalised
        exc["".join(parts)] = parts
        first = parts[0][0].upper() + parts[0][1:]
        exc["".join((first, *parts[1:]))] = (first, *parts[1:])
    for w in ABBREVIATIONS + EMOTICONS + [c + "." for c in "abcdefghijklmnopqrstuvwxyzäöü"]:
        exc[w] = (w,)
    for u in "cfkCFK":
        exc[f"°{u}."] = ("°", u, ".")
    both("i", "'m"), both("i", "m"), both("i", "'m", "a"), both("i", "m", "a")
    for w in ("i", "you", "he", "she", "it", "we", "they", "who", "what", "when", "where", "why", "how", "there",
              "that", "this", "these", "those"):
        for a in ("'", ""):   # with the apostrophe and without
            both(w, a + "ll"), both(w, a + "ll", a + "ve"), both(w, a + "d"), both(w, a + "d", a + "ve")
            if w in ("i", "you", "we", "they", "who", "what", "when", "where", "why", "how", "there", "these", "those"):
                both(w, a + "ve")
            if w in ("you", "we", "they", "who", "what", "when", "where", "why", "how", "there", "these", "those"):
                both(w, a + "re")
            if w in ("he", "she", "it", "who", "what", "when", "where", "why", "how", "there", "that", "this"):
                both(w, a + "s")
    for v in ("ca", "could", "do", "does", "did", "had", "may", "might", "must", "need", "ought", "sha", "should",
              "wo", "would"):
        both(v, "n't"), both(v, "nt"), both(v, "n't", "'ve"), both(v, "nt", "ve")
    for v in ("could", "might", "must", "should", "would"):
        both(v, "'ve"), both(v, "ve")
    for v in ("ai", "are", "is", "was", "were", "have", "has", "dare"):
        both(v, "n't"), both(v, "nt")
    for h in range(1, 13):
        for period in ("a.m.", "am", "p.m.", "pm"):
            exc[f"{h}{period}"] = (str(h), period)
    exc["y'all"], exc["yall"] = ("y'", "all"), ("y", "all")
    both("how", "'d", "'y"), both("not", "'ve"), both("not", "ve")
    both("can", "not"), both("gon", "na"), both("got", "ta"), both("let", "'s"), both("c'm", "on")
    for w in ("Ill", "ill", "Its", "its", "Hell", "hell", "Shell", "shell", "Shed", "shed", "were", "Were", "Well",
              "well", "Whore", "whore"):
        exc.pop(w, None)
    exc.update({k.replace("'", "’"): tuple(p.replace("'", "’") for p in v) for k, v in exc.items() if "'" in k})
    return exc


def _letter(cat: str, code: int) -> bool:
    """A letter as spaCy's lists have them: modifier letters only in the CJK punctuation and kana blocks."""
    return cat[0] == "L" and (cat != "Lm" or 0x3000 <= code < 0x3100)


def _letter_case(c: str) -> str | None:
    """"lower" or "upper" for a letter (an uncased letter is "lower"), None otherwise."""
    cat = unicodedata.category(c)
    if not _letter(cat, ord(c)):
        return None
    return "upper" if cat in ("Lu", "Lt") else "lower"


class _Memo(dict):
    """A dict that computes a missing value with ``fn`` and keeps it (at most ``size`` of them), so
    that ``map(memo.__getitem__, keys)`` runs at C speed over keys seen before."""

    def __init__(self, fn: Callable[[Any], Any], size: int = 500_000):
        super().__init__()
        self.fn, self.size = fn, size

    def __missing__(self, key):
        if len(self) >= self.size:
            self.clear()
        value = self[key] = self.fn(key)
        return value


def _ranges(codes: list[int]) -> str:
    """A regex character class body holding exactly ``codes`` (sorted)."""
    out, i = [], 0
    while i < len(codes):
        j = i
        while j + 1 < len(codes) and codes[j + 1] == codes[j] + 1:
            j += 1
        out.append(f"\\U{codes[i]:08x}" + (f"-\\U{codes[j]:08x}" if j > i else ""))
        i = j + 1
    return "".join(out)


class WordSplitter:
    """spaCy's English tokenizer rules (see above), with the words of each piece of text cached."""

    def __init__(self) -> None:
        cats = [unicodedata.category(chr(c)) for c in range(0x30000)]
        letter = [_letter(k, c) for c, k in enumerate(cats)]
        alpha = _ranges([c for c, k in enumerate(cats) if letter[c]])
        lower = _ranges([c for c, k in enumerate(cats) if letter[c] and k not in ("Lu", "Lt")])
        upper = _ranges([c for c, k in enumerate(cats) if letter[c] and k != "Ll"])
        symbols = [chr(c) for c, k in enumerate(cats) if k == "So"]
        icons = f"[{_ranges([ord(c) for c in symbols])}]"
        esc = lambda items: [re.escape(x) for x in items]   # noqa: E731
        quotes = "".join(esc(QUOTES))
        punct_chars = "".join(esc(sorted(set("".join(PUNCT)) | set("|(?:)"))))
        prefixes = [*esc(["§", "%", "=", "—", "–"]), r"\+(?![0-9])", *esc(PUNCT), r"\.\.+", "…", *esc(QUOTES),
                    *esc(CURRENCY), icons]
        suffixes = [*esc(PUNCT), r"\.\.+", "…", *esc(QUOTES), icons, *esc(["'s", "'S", "’s", "’S", "—", "–"]),
                    r"(?<=[0-9])\+", r"(?<=°[FfCcKk])\.", f"(?<=[0-9])(?:{'|'.join(esc(CURRENCY))})",
                    f"(?<=[0-9])(?:{'|'.join(esc(UNITS))})", rf"(?<=[0-9{lower}%²\-+{punct_chars}{quotes}])\.",
                    rf"(?<=[{upper}][{upper}])\."]
        infixes = [r"\.\.+", "…", icons, r"(?<=[0-9])[+\-*^](?=[0-9-])", rf"(?<=[{lower}{quotes}])\.(?=[{upper}{quotes}])",
                   rf"(?<=[{alpha}]),(?=[{alpha}])", rf"(?<=[{alpha}0-9])(?:{'|'.join(esc(HYPHENS))})(?=[{alpha}])",
                   rf"(?<=[{alpha}0-9])[:<>=/](?=[{alpha}])"]
        self.prefix = re.compile("|".join(prefixes)).match
        self.suffix = re.compile(f"(?:{'|'.join(suffixes)})$").search
        self.infixes = re.compile("|".join(infixes)).finditer
        # fast exits: the characters a prefix can start with, and those an infix needs
        self.prefix_starts = frozenset("§%=—–+." + "".join(PUNCT) + "".join(QUOTES) + "UCA" + "".join(CURRENCY)
                                       + "".join(symbols))
        self.one_char_suffix = frozenset("".join(PUNCT) + "".join(QUOTES) + "—–" + "".join(symbols))
        self.unit_ends = frozenset("²³%" + "".join(c[-1] for c in CURRENCY))
        self.dot_after = frozenset("0123456789%²-+|(?:)" + "".join(PUNCT) + "".join(QUOTES))
        self.no_digit = re.compile(r"[^0-9]*$").match
        self.may_infix = re.compile(rf"[.…+\-*^,–—~:<>=/]|{icons}").search
        host = r"[A-Za-z0-9\u00a1-\uffff]"
        self.url = re.compile(   # a URL stays one word: Diego Perini's URL pattern as spaCy adapts it
            r"^(?:[\w+\-.]{2,}://)?(?:\S+(?::\S*)?@)?(?:"
            r"(?!(?:10|127)(?:\.\d{1,3}){3})(?!(?:169\.254|192\.168)(?:\.\d{1,3}){2})"
            r"(?!172\.(?:1[6-9]|2\d|3[0-1])(?:\.\d{1,3}){2})"
            r"(?:[1-9]\d?|1\d\d|2[01]\d|22[0-3])(?:\.(?:1?\d{1,2}|2[0-4]\d|25[0-5])){2}"
            r"(?:\.(?:[1-9]\d?|1\d\d|2[0-4]\d|25[0-4]))"
            rf"|(?:(?:{host}[A-Za-z0-9\u00a1-\uffff_-]{{0,62}})?{host}\.)+(?:[{lower}]{{2,63}})"
            r")(?::\d{2,5})?(?:[/?#]\S*)?$").match
        self.special = _special_cases()
        # a special case that the rules would split is also rejoined where the rules produce its
        # pieces inside one piece of text ("Mr.Smith": "Mr", ".", "Smith" -> "Mr.", "Smith")
        self.rejoin: dict[str, list[tuple[tuple[str, ...], tuple[str, ...]]]] = {}
        for orth, words in self.special.items():
            pieces = tuple(self._split(orth, {}))
            if len(pieces) > 1:
                self.rejoin.setdefault(pieces[0], []).append((pieces, words))
        self.rejoin_starts = {pieces[:2] for found in self.rejoin.values() for pieces, _ in found}
        self.pieces = _Memo(self._piece)   # piece of text -> its words
        # piece of text -> one letter per word for the sentence count: T a sentence end, P other
        # punctuation, W anything else
        # (whitespace between pieces is one more word, not punctuation, unless it is a single space)
        self.kinds = _Memo(lambda s: ("" if s == " " else "W") if s.isspace() else
                           "".join("T" if w in TERMINAL else "P" if _is_punct(w) else "W" for w in self.pieces[s]))

    def _suffix_len(self, s: str) -> int:
        """Length of the suffix at the end of ``s`` (0: none), as the suffix pattern finds it."""
        last = s[-1]
        if last in self.one_char_suffix:   # no longer suffix ends in these
            return 2 if last == "…" and s.endswith("……") else 1
        if last == ".":
            if s.endswith(".."):   # a run of dots
                return len(s) - len(s.rstrip("."))
            return int(self._dot_ends(s))
        if last == "+":
            return int(len(s) > 1 and s[-2] in "0123456789")
        if last.isalnum() or last in self.unit_ends:   # 's, units, currency after a number: up to 5 characters
            if s[-2:] in ("'s", "'S", "’s", "’S"):
                return 2
            if self.no_digit(s, max(len(s) - 6, 0)):
                return 0
            m = self.suffix(s, max(len(s) - 6, 0))
            return m.end() - m.start() if m else 0
        return 0

    def _dot_ends(self, s: str) -> bool:
        """A final period is cut off after a digit, a lower-case letter, punctuation or a quote, two
        upper-case letters, or a temperature (°C)."""
        if len(s) < 2:
            return False
        p = s[-2]
        if p in self.dot_after or _letter_case(p) == "lower":
            return True
        return len(s) > 2 and (_letter_case(p) == _letter_case(s[-3]) == "upper" or s[-3] == "°" and p in "FfCcKk")

    def _split(self, s: str, special: dict) -> list[str]:
        prefixes: list[str] = []
        suffixes: list[str] = []
        last = -1
        while s and len(s) != last:
            if s in special:
                break
            last = len(s)
            pre = 0
            if s[0] in self.prefix_starts:
                m = self.prefix(s)
                pre = m.end() if m else 0
                if pre and s[pre:] in special:
                    prefixes.append(s[:pre])
                    s = s[pre:]
                    break
            suf = self._suffix_len(s[pre:]) if pre < len(s) else 0
            if suf and s[:-suf] in special:
                suffixes.append(s[-suf:])
                s = s[:-suf]
                break
            if pre and suf and pre + suf <= len(s):
                prefixes.append(s[:pre])
                suffixes.append(s[-suf:])
                s = s[pre:-suf]
            elif pre:
                prefixes.append(s[:pre])
                s = s[pre:]
            elif suf:
                suffixes.append(s[-suf:])
                s = s[:-suf]
        words = prefixes
        if s in special:
            words += special[s]
        elif s and (not self.may_infix(s, 1) or "." in s and self.url(s)):
            words.append(s)
        elif s:
            start = 0
            for m in self.infixes(s):
                a, b = m.span()
                if a == 0:   # an infix at the very start splits nothing
                    continue
                if a != start:
                    words.append(s[start:a])
                words.append(s[a:b])
                start = b
            if s[start:]:
                words.append(s[start:])
        words += reversed(suffixes)
        return words

    def _piece(self, s: str) -> tuple[str, ...]:
        words = self.special.get(s)
        if words is None:
            words = (s,) if s.isalpha() or s.isdecimal() else self._rejoined(self._split(s, self.special))
        return words

    def _rejoined(self, words: list[str]) -> tuple[str, ...]:
        if len(words) < 2 or self.rejoin_starts.isdisjoint(zip(words, words[1:])):
            return tuple(words)
        found = [(i, i + len(pieces), special) for i, w in enumerate(words) for pieces, special in self.rejoin.get(w, ())
                 if tuple(words[i:i + len(pieces)]) == pieces]
        taken: set[int] = set()
        chosen = []
        for start, end, special in sorted(found, key=lambda f: (f[0] - f[1], f[0])):   # longest first, then leftmost
            if start not in taken and end - 1 not in taken:
                chosen.append((start, end, special))
            taken.update(range(start, end))
        out, i = [], 0
        for start, end, special in sorted(chosen):
            out += words[i:start] + list(special)
            i = end
        return tuple(out + words[i:])

    def words(self, text: str) -> list[str]:
        return list(chain.from_iterable(map(self.pieces.__getitem__, text.split())))

    def count(self, text: str) -> int:
        return sum(map(len, map(self.pieces.__getitem__, text.split())))


@cache
def splitter() -> WordSplitter:
    return WordSplitter()


def split_words(text: str) -> list[str]:
    """The words of ``text`` as datatrove's English word tokenizer splits them, punctuation included."""
    return splitter().words(text)


def _is_punct(word: str) -> bool:   # spaCy's is_punct: every character in a P* category
    return all(unicodedata.category(c)[0] == "P" for c in word)


SENTENCE_BREAK_RE = re.compile("T[TP]*W")   # a sentence end, then the first word that is not punctuation
SPACES_RE = re.compile(r"(\s+)")


def count_sentences(line: str) -> int:
    """Sentences in one line as datatrove counts them for C4 (spaCy's rule-based sentencizer): a
    sentence ends at a sentence-ending character, and the next begins at the first word after it
    that is not punctuation. spaCy makes whitespace other than one space between words a word of
    its own ("end.  *" is two sentences, "end. *" one)."""
    return 1 + len(SENTENCE_BREAK_RE.findall("".join(map(splitter().kinds.__getitem__, SPACES_RE.split(line)))))


class Rule(NamedTuple):
    name: str       # reason suffix
    score: str      # score it reads
    bound: str      # the score must be: "min" >= t, "max" <= t, "above" > t, "below" < t, "in" one of t
    threshold: Any
    zero_ok: bool = False   # a score of exactly 0 passes (FineWeb's line_punct_exclude_zero)

    def fails(self, scores: dict) -> bool:
        v = scores[self.score]
        if self.zero_ok and v == 0:
            return False
        return {"min": lambda: v < self.threshold, "max": lambda: v > self.threshold,
                "above": lambda: v <= self.threshold, "below": lambda: v >= self.threshold,
                "in": lambda: v not in self.threshold}[self.bound]()


class Doc:
    """A document as the filters see it: its URL and text (C4 may remove lines), words on demand."""

    def __init__(self, text: str, url: str | None):
        self.url, self.text = url or "", text

    @property
    def text(self) -> str:
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        self._text, self._words = value, None

    @property
    def words(self) -> list[str]:
        if self._words is None:
            self._words = split_words(self._text)
        return self._words

    @property
    def n_words(self) -> int:
        return len(self._words) if self._words is not None else splitter().count(self._text)


_HAS_LETTER = _Memo(lambda w: any(c.isalpha() for c in w))           # word -> it has a letter
_WORD_LENGTH = _Memo(lambda w: 0 if PUNCTUATION.issuperset(w) else len(w))   # 0: punctuation only


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items seen before, their total characters)."""
    seen: set[str] = set()
    count = chars = 0
    for x in items:
        if x in seen:
            count, chars = count + 1, chars + len(x)
        else:
            seen.add(x)
    return count, chars


def _ngrams(words: list[str], ns: Iterable[int], sep: str) -> dict[int, list[str]]:
    """{n: every word n-gram, its words joined by ``sep``} for each n in ``ns``, each list of
    (n+1)-grams made from the n-grams by adding one word."""
    ns = set(ns)
    out, grams = {}, words
    tails = [sep + w for w in words] if sep else words
    for n in range(2, max(ns, default=1) + 1):
        grams = list(map(add, grams, tails[n - 1:]))
        if n in ns:
            out[n] = grams
    return out


def _top_ngram_chars(grams: list[str]) -> int:
    """Characters of the most frequent n-gram times its count; the first seen among equally
    frequent ones (Counter.most_common, as datatrove)."""
    if not grams:
        return 0
    gram, count = Counter(grams).most_common(1)[0]
    return len(gram) * count


def _duplicated_ngram_chars(grams: list[str], n: int) -> int:
    """Characters of n-grams that repeat an earlier one, read left to right as datatrove reads
    them: a repeat counts its characters and skips the next n-1 n-grams (overlaps count once),
    and a skipped n-gram is not remembered. Only the n-grams seen before somewhere are visited: an
    n-gram is remembered when its first occurrence was not skipped, or a later one was read."""
    first = dict(zip(reversed(grams), range(len(grams) - 1, -1, -1)))
    if len(first) == len(grams):
        return 0
    firsts = list(map(first.__getitem__, grams))
    chars = resume = 0
    repeats: list[int] = []     # positions of the repeats counted so far (each skips n-1 after it)
    read_again: set[str] = set()   # n-grams remembered from a later occurrence that was read
    for i in compress(range(len(grams)), map(ne, firsts, range(len(grams)))):
        if i < resume:
            continue
        gram, j = grams[i], firsts[i]
        k = bisect_left(repeats, j)
        if k == 0 or j >= repeats[k - 1] + n or gram in read_again:
            chars += len(gram)
            repeats.append(i)
            resume = i + n
        else:
            read_again.add(gram)
    return chars


_P = 0x100000001B3                # hash base (odd, so invertible modulo 2**64)
_Q = pow(_P, -1, 2 ** 64)
_LENGTH_MIX = np.uint64(0x9E3779B97F4A7C15)
_POWERS: dict[int, np.ndarray] = {}


def _powers(base: int, n: int) -> np.ndarray:
    """base**0 .. base**(n-1) modulo 2**64 (uint64 arithmetic wraps)."""
    p = _POWERS.get(base)
    if p is None or len(p) < n:
        p = np.full(max(n, 2 * len(p) if p is not None else 1 << 16), base, dtype=np.uint64)
        p[0] = 1
        np.cumprod(p, out=p)
        _POWERS[base] = p
    return p[:n]


class NGrams:
    """A document's word n-grams as spans of its words joined by ``sep`` ("the cat" with " ",
    "thecat" with ""), each keyed by a 64-bit polynomial hash of its characters and length, all
    computed at once with numpy instead of building every n-gram string. Equal n-grams have equal
    keys; where two different n-grams share a key (a hash collision) would change a result, the
    n-gram strings are compared and the exact string computation above is used instead."""

    def __init__(self, words: list[str], sep: str):
        self.words, self.sep = words, sep
        self.text = text = sep.join(words)
        lengths = np.fromiter(map(len, words), np.int64, len(words))
        starts = np.zeros(len(words) + 1, np.int64)
        np.cumsum(lengths + len(sep), out=starts[1:])
        ends = starts[:-1] + lengths
        self.starts, self.ends = starts, ends
        self.start_at, self.end_at = starts.tolist(), ends.tolist()
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32).astype(np.uint64) + np.uint64(1)
        self.prefix = np.zeros(len(text) + 1, np.uint64)   # sum of code * _Q**position before each character
        np.cumsum(codes * _powers(_Q, len(text)), out=self.prefix[1:])

    def keys(self, n: int) -> np.ndarray:
        """The key of every n-gram, in order."""
        a, b = self.starts[:max(len(self.words) - n + 1, 0)], self.ends[n - 1:]
        # sum of code * _P**(distance to the n-gram's last character): the same wherever it occurs
        h = (self.prefix[b] - self.prefix[a]) * _powers(_P, len(self.text) + 1)[np.maximum(b - 1, 0)]
        return h ^ ((b - a).astype(np.uint64) * _LENGTH_MIX)

    def _gram(self, i: int, n: int) -> str:
        return self.text[self.start_at[i]:self.end_at[i + n - 1]]

    def top_chars(self, n: int) -> int:
        """As ``_top_ngram_chars``."""
        keys = self.keys(n)
        if not len(keys):
            return 0
        _, first, counts = np.unique(keys, return_index=True, return_counts=True)
        count = int(counts.max())
        i = int(first[counts == count].min())   # the first seen of the most frequent
        gram = self._gram(i, n)
        if count > 1 and any(self._gram(j, n) != gram for j in np.flatnonzero(keys == keys[i]).tolist()):
            return _top_ngram_chars(_ngrams(self.words, [n], self.sep)[n])   # a collision
        return len(gram) * count

    def duplicated_chars(self, n: int) -> int:
        """As ``_duplicated_ngram_chars``: only the n-grams seen before are visited, and a counted
        repeat jumps past the n-1 it skips."""
        keys = self.keys(n)
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        if len(first) == len(keys):
            return 0
        firsts = first[inverse]
        seen_before = np.flatnonzero(firsts != np.arange(len(keys)))
        at, firsts = seen_before.tolist(), firsts[seen_before].tolist()
        chars = p = 0
        repeats: list[int] = []            # positions of the repeats counted so far
        read_again: dict[int, int] = {}    # first occurrence -> a later occurrence that was read
        while p < len(at):
            i, j = at[p], firsts[p]
            k = bisect_left(repeats, j)
            earlier = j if k == 0 or j >= repeats[k - 1] + n else read_again.get(j)
            if earlier is None:            # its first occurrence was skipped: now it is remembered
                read_again[j] = i
                p += 1
                continue
            gram = self._gram(i, n)
            if gram != self._gram(earlier, n):
                return _duplicated_ngram_chars(_ngrams(self.words, [n], self.sep)[n], n)   # a collision
            chars += len(gram)
            repeats.append(i)
            p = bisect_left(at, i + n, p + 1)
        return chars


# --- URL blocklist ---------------------------------------------------------------------------

def url_scores(doc: Doc, cfg) -> dict[str, float]:
    labels = (urlsplit(doc.url).hostname or "").lower().rstrip(".").split(".")
    suffixes = {".".join(labels[i:]) for i in range(len(labels))}   # the host and each parent domain
    url = doc.url.lower()
    return {"blocked_domain": float(not _domains(tuple(cfg.blocked_domains)).isdisjoint(suffixes)),
            "blocked_substring": float(any(s.lower() in url for s in cfg.blocked_substrings))}


@cache
def _domains(blocked: tuple[str, ...]) -> frozenset[str]:
    """The blocklist as a set, built once: a host is looked up by its suffixes, not the list scanned."""
    return frozenset(d.lower().strip(".") for d in blocked)


def url_rules(cfg) -> list[Rule]:
    return [Rule("blocked_domain", "blocked_domain", "max", 0), Rule("blocked_substring", "blocked_substring", "max", 0)]


# --- language identification -----------------------------------------------------------------

@cache
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def language_scores(doc: Doc, cfg) -> dict[str, Any]:
    lang, prob = _identifier().classify(doc.text.replace("\n", " ")) if doc.text.strip() else ("", 0.0)
    return {"language": lang, "score": float(prob)}


def language_rules(cfg) -> list[Rule]:
    # FineWeb keeps a document whose best language is listed with a score above the threshold
    return [Rule("language", "language", "in", tuple(cfg.languages)), Rule("min_score", "score", "above", cfg.min_score)]


# --- Gopher ----------------------------------------------------------------------------------

def gopher_repetition_scores(doc: Doc, cfg) -> dict[str, float]:
    """As datatrove computes them: paragraphs split at blank lines, lines at runs of newlines (so
    blank lines are no duplicate lines), character fractions over the whole text; the most
    frequent n-gram is its words joined by spaces, duplicated n-grams are joined with nothing."""
    text, words = doc.text, doc.words
    n_chars = max(len(text), 1)
    paragraphs = PARAGRAPH_RE.split(text.strip())
    lines = LINE_RUNS_RE.split(text)
    para_dups, para_chars = _duplicates(paragraphs)
    line_dups, line_chars = _duplicates(lines)
    s = {"dup_para_frac": para_dups / len(paragraphs), "dup_para_char_frac": para_chars / n_chars,
         "dup_line_frac": line_dups / len(lines), "dup_line_char_frac": line_chars / n_chars}
    spaced, joined = NGrams(words, " "), NGrams(words, "")
    for n in cfg.top_n_grams:
        s[f"top_{n}_gram_char_frac"] = spaced.top_chars(n) / n_chars
    for n in cfg.dup_n_grams:
        s[f"dup_{n}_gram_char_frac"] = joined.duplicated_chars(n) / n_chars
    return s


def gopher_repetition_rules(cfg) -> list[Rule]:
    rules = [Rule(k, k, "max", getattr(cfg, k))
             for k in ("dup_para_frac", "dup_para_char_frac", "dup_line_frac", "dup_line_char_frac")]
    rules += [Rule(f"top_{n}_gram", f"top_{n}_gram_char_frac", "max", t) for n, t in cfg.top_n_grams.items()]
    rules += [Rule(f"dup_{n}_gram", f"dup_{n}_gram_char_frac", "max", t) for n, t in cfg.dup_n_grams.items()]
    return rules


def gopher_quality_scores(doc: Doc, cfg) -> dict[str, float]:
    """As datatrove computes them: word counts and lengths over words that are not only
    punctuation; symbol and alphabetic ratios over all words, punctuation included; distinct stop
    words (as written: "The" is not "the")."""
    text, words = doc.text, doc.words
    lengths = list(map(_WORD_LENGTH.__getitem__, words))
    n_real = len(lengths) - lengths.count(0)
    n_all = max(len(words), 1)
    lines = text.splitlines() or [""]
    return {
        "n_words": float(n_real),
        "avg_word_length": sum(lengths) / max(n_real, 1),
        "hash_word_ratio": text.count("#") / n_all,
        "ellipsis_word_ratio": (text.count("...") + text.count("…")) / n_all,
        "bullet_lines_ratio": sum(ln.lstrip().startswith(BULLETS) for ln in lines) / len(lines),
        "ellipsis_lines_ratio": sum(ln.rstrip().endswith(("...", "…")) for ln in lines) / len(lines),
        "alpha_words_ratio": sum(map(_HAS_LETTER.__getitem__, words)) / n_all,
        "stop_words": float(len(set(cfg.stop_words).intersection(words))),
    }


def gopher_quality_rules(cfg) -> list[Rule]:
    return [
        Rule("min_doc_words", "n_words", "min", cfg.min_doc_words),
        Rule("max_doc_words", "n_words", "max", cfg.max_doc_words),
        Rule("min_avg_word_length", "avg_word_length", "min", cfg.min_avg_word_length),
        Rule("max_avg_word_length", "avg_word_length", "max", cfg.max_avg_word_length),
        Rule("max_hash_ratio", "hash_word_ratio", "max", cfg.max_symbol_word_ratio),
        Rule("max_ellipsis_ratio", "ellipsis_word_ratio", "max", cfg.max_symbol_word_ratio),
        Rule("max_bullet_lines_ratio", "bullet_lines_ratio", "max", cfg.max_bullet_lines_ratio),
        Rule("max_ellipsis_lines_ratio", "ellipsis_lines_ratio", "max", cfg.max_ellipsis_lines_ratio),
        Rule("min_alpha_words_ratio", "alpha_words_ratio", "min", cfg.min_alpha_words_ratio),
        Rule("min_stop_words", "stop_words", "min", cfg.min_stop_words),
    ]


# --- C4, as FineWeb applies it ---------------------------------------------------------------

CITATION_RE = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
END_PUNCTUATION = (".", "?", "!", '"', "'")
POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


def c4_scores(doc: Doc, cfg) -> dict[str, float]:
    """C4's line rules, in C4's order; the lines that survive become the document's text. As in
    datatrove, the first line with "lorem ipsum" or "{" ends the reading (the document is
    dropped), and sentences are counted per line (``count_sentences``)."""
    removed: Counter[str] = Counter()
    flags = {"lorem_ipsum": 0.0, "curly_bracket": 0.0}
    kept, sentences = [], 0
    lines = doc.text.splitlines()
    for line in lines:
        line = line.strip()
        words = line.split()
        if cfg.max_word_length >= 0 and any(len(w) > cfg.max_word_length for w in words):
            removed["too_long_word"] += 1
            continue
        if cfg.remove_citations:
            line = CITATION_RE.sub("", line)
        if cfg.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith("...")):
            removed["no_terminal_punct"] += 1
            continue
        if len(words) < cfg.min_words_per_line:
            removed["too_few_words"] += 1
            continue
        low = line.lower()
        if cfg.filter_lorem_ipsum and "lorem ipsum" in low:
            flags["lorem_ipsum"] = 1.0
            break
        if cfg.filter_javascript and "javascript" in low:
            removed["javascript"] += 1
            continue
        if cfg.filter_curly_bracket and "{" in line:
            flags["curly_bracket"] = 1.0
            break
        if cfg.filter_policy and any(p in low for p in POLICY):
            removed["policy"] += 1
            continue
        if cfg.min_num_sentences != -1:
            sentences += count_sentences(line)
        kept.append(line)
    doc.text = "\n".join(kept).strip()
    return {**flags, "sentences": float(sentences), "lines": float(len(lines)),
            **{f"lines_removed_{k}": float(removed[k]) for k in C4_LINE_RULES}}


C4_LINE_RULES = ("too_long_word", "no_terminal_punct", "too_few_words", "javascript", "policy")


def c4_rules(cfg) -> list[Rule]:
    return [Rule("lorem_ipsum", "lorem_ipsum", "max", 0), Rule("curly_bracket", "curly_bracket", "max", 0),
            Rule("too_few_sentences", "sentences", "min", cfg.min_num_sentences)]


# --- FineWeb's own rules ---------------------------------------------------------------------

def fineweb_scores(doc: Doc, cfg) -> dict[str, float]:
    """As datatrove computes them: over the lines that are not blank; a line ends in terminal
    punctuation when its last character is a sentence terminal (quotes are not)."""
    text = doc.text
    lines = [ln for ln in text.split("\n") if ln.strip()]
    n_lines = max(len(lines), 1)
    return {
        "line_punct_ratio": sum(ln[-1] in TERMINAL for ln in lines) / n_lines,
        "short_line_ratio": sum(len(ln) <= cfg.short_line_length for ln in lines) / n_lines,
        "char_dup_ratio": _duplicates(lines)[1] / max(len(text) - text.count("\n"), 1),
        "list_ratio": text.count("\n") / max(doc.n_words, 1),
    }


def fineweb_rules(cfg) -> list[Rule]:
    return [Rule("line_punct_ratio", "line_punct_ratio", "min", cfg.line_punct_thr, cfg.line_punct_exclude_zero),
            Rule("short_line_ratio", "short_line_ratio", "max", cfg.short_line_thr),
            Rule("char_dup_ratio", "char_dup_ratio", "max", cfg.char_duplicates_ratio),
            Rule("list_ratio", "list_ratio", "max", cfg.new_line_ratio)]


# --- the shared mechanism --------------------------------------------------------------------

class Filter(NamedTuple):
    name: str
    cfg: object
    scores: Callable[[Doc, object], dict[str, Any]]
    rules: list[Rule]


def build_filters(cfg) -> list[Filter]:
    """The enabled filters, in FineWeb's order."""
    table = [("url", cfg.url, url_scores, url_rules),
             ("language", cfg.language, language_scores, language_rules),
             ("gopher_repetition", cfg.gopher_repetition, gopher_repetition_scores, gopher_repetition_rules),
             ("gopher_quality", cfg.gopher_quality, gopher_quality_scores, gopher_quality_rules),
             ("c4", cfg.c4, c4_scores, c4_rules),
             ("fineweb", cfg.fineweb, fineweb_scores, fineweb_rules)]
    return [Filter(name, c, scores, rules(c)) for name, c, scores, rules in table if c.enabled and cfg.enabled]


def judge(doc: Doc, filters: list[Filter]) -> tuple[dict[str, Any], str | None]:
    """All scores of one document (prefixed by filter name) and the first failed rule, or None.
    Filters that change the text (C4) leave the cleaned text in ``doc``."""
    scores: dict[str, Any] = {}
    reason = None
    for f in filters:
        s = f.scores(doc, f.cfg)
        scores.update({f"{f.name}.{k}": v for k, v in s.items()})
        if reason is None:
            failed = next((r for r in f.rules if r.fails(s)), None)
            reason = f"{f.name}:{failed.name}" if failed else None
    return scores, reason


def score_fields(filters: list[Filter]) -> list[pa.Field]:
    probe = judge(Doc("a b", "http://a/"), filters)[0]
    return [pa.field(k, pa.string() if isinstance(v, str) else pa.float64()) for k, v in probe.items()]


EMAIL_RE = re.compile(r"\b[\w.!#$%&'*+/=?^`{|}~-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}\b")
IPV4_RE = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")


def mask_pii(text: str, cfg) -> tuple[str, int]:
    """E-mail addresses and public IPv4 addresses replaced; returns the text and how many were."""
    n = 0
    if cfg.mask_emails:
        text, k = EMAIL_RE.subn("email@example.com", text)
        n += k
    if cfg.mask_ips:
        def public(m: re.Match) -> str:
            nonlocal n
            if ipaddress.ip_address(m.group()).is_global:
                n += 1
                return "0.0.0.0"
            return m.group()
        text = IPV4_RE.sub(public, text)
    return text, n


def filter_batch(rows: list[dict], cfg) -> tuple[list[tuple[dict, str | None]], Counter, int]:
    """A shard of work, in a worker: each row with its scores and the reason it fails (None: kept,
    with the text as the filters left it); C4's removed lines by rule; PII masked."""
    filters = build_filters(cfg)
    out: list[tuple[dict, str | None]] = []
    lines_removed: Counter[str] = Counter()
    masked = 0
    for row in rows:
        doc = Doc(row["text"], row["url"])
        scores, reason = judge(doc, filters)
        if reason:
            out.append(({**row, **scores}, reason))
            continue
        lines_removed.update({k.split("lines_removed_")[1]: int(v) for k, v in scores.items()
                              if "lines_removed_" in k})
        text, n = mask_pii(doc.text, cfg.pii)
        masked += n
        out.append(({**row, **scores, "text": text}, None))
    return out, lines_removed, masked


def filter_docs(cfg, docs: dict, stage_dir: str | Path, runner: dict | None = None) -> dict:
    """Run the filter stage over the extract manifest ``docs``; returns its manifest. Batches of
    documents are judged in worker processes, or on Dask (``runner``, see tasks.workers).

    Kept documents carry the text as the filters left it (C4's line removal, masking);
    dropped ones the text they came with."""
    t0 = time.time()
    schema = with_fields(DOC_SCHEMA, score_fields(build_filters(cfg)))  # loads the language model before fork
    lines_removed: Counter[str] = Counter()
    masked = 0
    with StageWriter("filter", stage_dir, schema) as w, shard_pool(runner, "filter", cfg.processes) as pool, \
            tqdm(total=docs["rows"], desc="filter", unit="doc") as bar:
        batches = batched(iter_rows(docs), DASK_BATCH if isinstance(pool, DaskShards) else BATCH, docs["rows"], pool.width)
        for batch, (judged, removed, n) in in_order(pool, batches, lambda b: pool.submit(filter_batch, b, cfg)):
            for row, reason in judged:
                if reason:
                    w.drop(row, reason)
                else:
                    w.keep(row)
            lines_removed.update(removed)
            masked += n
            bar.update(len(batch))
        w.extra = {"seconds": round(time.time() - t0, 3), "input_rows": docs["rows"],
                   "lines_removed": dict(sorted(lines_removed.items())), "pii_masked": masked, **pool_extra(pool)}
    return w.manifest


@stage_task("filter")
def filter_task(ctx: dict, section: dict, inputs: list[dict], run_id: str) -> tuple[dict, dict]:
    m = filter_docs(FilterConfig.model_validate(section), inputs[0], stage_dir(ctx, "filter"), ctx.get("runner"))
    return m, {"pii_masked": float(m["pii_masked"]),
               **{f"c4_lines_removed.{k}": float(v) for k, v in m["lines_removed"].items()}}
