"""decode_page on real text: damaged UTF-8, and legacy encodings with lying, missing or right labels.

Every text here is real and installed with Python or the project: CPython's own codec test data
(Lib/test/cjkencodings), jusText's stop lists (real words of many languages), the translation
catalogues of WTForms and humanize, the help topics pydoc ships (English prose with curly quotes
and dashes), and the real pydoc pages of the ``site_dir`` fixture, into which the text is put where
a page is needed. The Python documentation HTML and git's Korean catalogue are used when the
system has them.
"""

from __future__ import annotations

import gettext
import html
import importlib.util
import pathlib
import pydoc_data.topics
import random
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import justext
import pytest

from tasks.charset import Undecodable, codec_for, decode_page, looks_binary

STOPLISTS = pathlib.Path(justext.__file__).parent / "stoplists"
PYTHON_DOCS = sorted(pathlib.Path("/usr/share/doc").glob("python3*/html/whatsnew/2.6.html"))
GIT_KO = pathlib.Path("/usr/share/locale/ko/LC_MESSAGES/git.mo")
MOJIBAKE = ("â€", "Ã", "Â", "‚Ä", "Ä¶")   # UTF-8 read as cp1252 / mac-roman


def po_text(locale: str) -> str:
    """The translated messages of WTForms' catalogue for ``locale``."""
    import wtforms  # installed with mlflow
    po = pathlib.Path(wtforms.__file__).parent / "locale" / locale / "LC_MESSAGES" / "wtforms.po"
    return "\n".join(re.findall(r'^msgstr(?:\[\d+\])? "(.+)"$', po.read_text("utf-8"), re.M))


def humanize_po(locale: str) -> str:
    """The translated messages of humanize's catalogue for ``locale``."""
    import humanize  # installed with prefect
    po = pathlib.Path(humanize.__file__).parent / "locale" / locale / "LC_MESSAGES" / "humanize.po"
    return "\n".join(re.findall(r'^msgstr(?:\[\d+\])? "(.+)"$', po.read_text("utf-8"), re.M))


def stoplist(language: str, lines: int = 400) -> str:
    return "\n".join((STOPLISTS / f"{language}.txt").read_text("utf-8").splitlines()[:lines])


def cjk(name: str) -> str:
    """The UTF-8 twin of CPython's codec test text for ``name``."""
    spec = importlib.util.find_spec("test")
    path = spec and pathlib.Path(spec.origin).parent / "cjkencodings" / f"{name}-utf8.txt"
    assert path and path.exists(), "CPython's test data (Lib/test/cjkencodings) is missing from this Python"
    return path.read_text("utf-8")


def topics() -> str:
    """pydoc's help topics with the most typographic quotes and dashes."""
    return "\n\n".join(pydoc_data.topics.topics[k] for k in ("compound", "specialnames", "types"))


TEXTS = {
    "topics": topics, "french": lambda: stoplist("French"), "german": lambda: stoplist("German"),
    "russian": lambda: stoplist("Russian"), "ukrainian": lambda: stoplist("Ukrainian"),
    "korean": lambda: stoplist("Korean"), "po-fr": lambda: po_text("fr"), "po-ja": lambda: po_text("ja"),
    "po-zh": lambda: po_text("zh"), "po-zh_TW": lambda: po_text("zh_TW"), "po-ko": lambda: po_text("ko"),
    "po-ru": lambda: po_text("ru"), "humanize-ru": lambda: humanize_po("ru_RU"),
    "humanize-uk": lambda: humanize_po("uk_UA"), "cjk-shift_jis": lambda: cjk("shift_jis"),
    "cjk-euc_jp": lambda: cjk("euc_jp"), "cjk-big5": lambda: cjk("big5"),
}


def encodable(text: str, encoding: str) -> str:
    """The lines of ``text`` that ``encoding`` can write."""
    lines = text.splitlines()
    return "\n".join(line for line in lines if line.encode(encoding, "ignore").decode(encoding) == line)


def page(site_dir: pathlib.Path, text: str, meta: str | None = "utf-8") -> str:
    """A real pydoc page with ``text`` at the end of its body and ``meta`` as its <meta charset>."""
    doc = (site_dir / "heapq.html").read_text("utf-8")
    doc = doc.replace('<meta charset="utf-8">', f'<meta charset="{meta}">' if meta else "")
    return doc.replace("</body>", f"<pre>{html.escape(text, quote=False)}</pre>\n</body>")


def damage(body: bytes, seed: int, spots: int = 3, ops: tuple[int, ...] = (0, 1, 2)) -> bytes:
    """UTF-8 damaged the ways pages are: 0, a multi-byte sequence cut short; 1, a stray byte from
    another encoding; 2, an ASCII byte overwritten. Only after <body>, so the <meta> survives."""
    rng, b = random.Random(seed), bytearray(body)
    start = body.index(b"<body")
    for _ in range(spots):
        op = rng.choice(ops)
        leads = [i for i in range(start, len(b)) if b[i] >= 0xC0]
        if op == 0 and leads:                           # (no sequence left to cut: a stray byte)
            i = rng.choice(leads) + 1
            while i < len(b) and 0x80 <= b[i] < 0xC0:
                i += 1
            del b[i - 1]
        elif op in (0, 1):
            i = rng.randrange(start, len(b))
            while 0x80 <= b[i] < 0xC0:
                i += 1
            b.insert(i, rng.randrange(0x80, 0x100))
        else:
            ascii_at = [i for i in range(start, len(b)) if b[i] < 0x80]
            b[rng.choice(ascii_at)] = rng.choice((0xFF, 0xFE, 0xC0, 0xF5))
    return bytes(b)


def assert_no_mojibake(text: str, original: str) -> None:
    for marker in MOJIBAKE:
        assert text.count(marker) <= original.count(marker), f"mojibake {marker!r} in the decoded text"


# --- damaged UTF-8 ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name", ["topics", "french", "russian", "korean", "po-ja", "po-zh", "cjk-big5"])
def test_damaged_utf8_stays_utf8_with_every_intact_character(site_dir, name, seed):
    text = TEXTS[name]()
    for meta, source in (("utf-8", "meta"), (None, "utf8")):
        body = page(site_dir, text, meta).encode("utf-8")
        damaged = damage(body, seed)
        expected = damaged.decode("utf-8", "replace")
        got = decode_page(damaged)
        assert got.text == expected                     # every undamaged character, in place
        assert (got.charset, got.source) == ("utf-8", source)
        assert got.replaced >= expected.count("\ufffd") - body.decode().count("\ufffd") > 0
        assert_no_mojibake(got.text, body.decode())


@pytest.mark.parametrize("seed", range(3))
def test_damaged_python_docs_page_stays_utf8(seed):
    assert PYTHON_DOCS, "the Python documentation (Debian package python3-doc) is missing: `make test` installs it"
    body = PYTHON_DOCS[0].read_bytes()                  # a real UTF-8 page, full of “quotes” and dashes
    damaged = damage(body, seed, spots=5)
    got = decode_page(damaged, "utf-8")
    assert (got.charset, got.source) == ("utf-8", "http")
    assert got.text == damaged.decode("utf-8", "replace") and got.replaced > 0
    assert_no_mojibake(got.text, body.decode())


def test_utf8_wins_over_a_latin1_label(site_dir):
    text = "\n".join((topics(), cjk("gb2312"), po_text("ru")))
    for header, meta, source in (("iso-8859-1", "utf-8", "utf8"),    # the header's label is the one in force
                                 ("iso-8859-1", None, "utf8"), (None, "iso-8859-1", "utf8"), (None, "utf-8", "meta")):
        body = page(site_dir, text, meta).encode("utf-8")
        got = decode_page(body, header)
        assert (got.text, got.charset, got.source, got.replaced) == (body.decode("utf-8"), "utf-8", source, 0)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("module", ["heapq", "email.message", "tarfile", "sqlite3", "zipfile"])
def test_a_utf8_label_outweighs_a_few_bad_bytes_in_a_mostly_ascii_page(site_dir, module, seed):
    """Real pydoc pages with one to fifteen non-ASCII characters (ç, ß, ä, box drawing), labelled
    UTF-8, with two stray or overwritten bytes: too few valid sequences to outnumber the bad
    bytes three to one, but the label and one valid sequence outweigh them."""
    body = (site_dir / f"{module}.html").read_bytes()
    damaged = damage(body, seed, spots=2, ops=(1, 2))
    for header, source in (("utf-8", "http"), (None, "meta")):
        got = decode_page(damaged, header)
        assert got.text == damaged.decode("utf-8", "replace")
        assert (got.charset, got.source) == ("utf-8", source) and 0 < got.replaced <= 2


# --- legacy encodings ------------------------------------------------------------------------

LEGACY = [("french", "cp1252"), ("french", "latin-1"), ("german", "cp1252"), ("po-fr", "cp1252"),
          ("po-ja", "shift_jis"), ("po-ja", "euc_jp"), ("cjk-shift_jis", "shift_jis"), ("cjk-euc_jp", "euc_jp"),
          ("po-zh", "gb2312"), ("po-zh", "gbk"), ("po-zh_TW", "big5"), ("po-ko", "euc_kr"), ("korean", "euc_kr"),
          ("russian", "koi8-r"), ("russian", "cp1251"), ("po-ru", "koi8-r"), ("po-ru", "cp1251"),
          ("ukrainian", "cp1251"), ("humanize-ru", "koi8-r"), ("humanize-uk", "koi8-u")]
WESTERN = {"cp1252", "latin-1"}


def legacy_page(site_dir, name: str, encoding: str, meta: str | None) -> tuple[bytes, str]:
    doc = page(site_dir, encodable(TEXTS[name](), encoding), meta)
    body = doc.encode(encoding, "xmlcharrefreplace")    # what the page's own characters become
    return body, body.decode(encoding)


@pytest.mark.parametrize("name, encoding", LEGACY)
def test_legacy_page_with_a_wrong_or_no_label_is_detected(site_dir, name, encoding):
    """Mislabelled (utf-8 in the header or the <meta>, utf-16 in the header, latin-1 for
    non-Western text) or unlabelled."""
    labels = [(None, None), ("utf-8", None), (None, "utf-8"), ("utf-16", None)]
    if encoding not in WESTERN:
        labels.append(("iso-8859-1", None))
    for header, meta in labels:
        body, expected = legacy_page(site_dir, name, encoding, meta)
        got = decode_page(body, header)
        assert got.text == expected, (header, meta, got.charset)
        assert got.source == "detected" and got.replaced == 0


@pytest.mark.parametrize("name, encoding", LEGACY)
def test_legacy_page_with_its_right_label_is_decoded_by_it(site_dir, name, encoding):
    codec = codec_for(encoding)
    body, expected = legacy_page(site_dir, name, encoding, None)
    got = decode_page(body, encoding)
    assert (got.text, got.charset, got.source, got.replaced) == (expected, codec, "http", 0)
    for meta in (f'<meta charset="{encoding}">',
                 f'<meta http-equiv="Content-Type" content="text/html; charset={encoding}">'):
        body = legacy_page(site_dir, name, encoding, None)[0].replace(b"<head>", b"<head>" + meta.encode())
        got = decode_page(body, None)
        assert (got.text, got.charset, got.source) == (body.decode(encoding), codec, "meta")
    body, expected = legacy_page(site_dir, name, encoding, None)
    got = decode_page(f'<?xml version="1.0" encoding="{encoding}"?>\n'.encode() + body)
    assert (got.text[got.text.index("<!DOCTYPE"):], got.charset, got.source) == (expected, codec, "meta")


@pytest.mark.parametrize("name, encoding", [("po-ja", "shift_jis"), ("po-ja", "euc_jp"), ("po-zh", "gb2312"),
                                            ("po-zh_TW", "big5"), ("po-ko", "euc_kr"), ("cjk-shift_jis", "shift_jis")])
def test_labelled_legacy_page_with_damaged_bytes_keeps_its_label(site_dir, name, encoding):
    """Two double-byte characters cut in half (their trail byte lost) in a rightly labelled page."""
    doc = legacy_page(site_dir, name, encoding, None)[1]
    cut = [i for i in range(doc.index("<pre>"), len(doc) - 1)
           if len(doc[i].encode(encoding, "ignore")) == 2 and doc[i + 1] in "\n .,:;!?)"]
    cut = [cut[len(cut) // 3], cut[2 * len(cut) // 3]]
    damaged = b"".join(doc[a:b].encode(encoding) + doc[b].encode(encoding)[:1]
                       for a, b in zip([0, cut[0] + 1], cut)) + doc[cut[1] + 1:].encode(encoding)
    codec = codec_for(encoding)
    got = decode_page(damaged, encoding)
    assert (got.charset, got.source, got.replaced) == (codec, "http", 2)
    assert got.text == doc[:cut[0]] + "\ufffd" + doc[cut[0] + 1:cut[1]] + "\ufffd" + doc[cut[1] + 1:]


def test_short_unlabelled_korean_pages_are_detected(site_dir):
    """Six messages of git's Korean catalogue per page, in EUC-KR without a label. On about one
    page in sixteen detection finds nothing at its default chaos limit and must look again."""
    assert GIT_KO.exists(), f"{GIT_KO} (git's Korean messages, Debian package git) is missing"
    with GIT_KO.open("rb") as f:
        messages = [v for k, v in gettext.GNUTranslations(f)._catalog.items() if k and isinstance(v, str)]
    for i in range(60, 110, 2):
        text = encodable("\n".join(messages[i:i + 6]), "euc_kr")
        body = page(site_dir, text, None).encode("euc_kr", "xmlcharrefreplace")
        got = decode_page(body)
        assert (got.text, got.charset, got.source) == (body.decode("euc_kr"), "cp949", "detected"), i


# --- the crawler's hostile site (tests/hostile.py), byte for byte -----------------------------

def test_hostile_lying_charsets(site_dir):
    heapq = (site_dir / "heapq.html").read_bytes()
    ok = decode_page(heapq, "utf-8")
    assert "François Pinard" in ok.text and (ok.charset, ok.source) == ("utf-8", "http")
    latin1 = decode_page(heapq, "iso-8859-1")            # UTF-8 bytes labelled ISO-8859-1
    assert "François Pinard" in latin1.text and (latin1.charset, latin1.source) == ("utf-8", "utf8")
    cp1252 = decode_page(heapq.decode().encode("cp1252", "xmlcharrefreplace"), "utf-8")  # and the reverse
    assert "François Pinard" in cp1252.text and (cp1252.charset, cp1252.source) == ("cp1252", "detected")
    utf16 = decode_page(heapq.decode().encode("utf-16"), None)
    assert utf16.text == heapq.decode() and (utf16.charset, utf16.source) == ("utf-16", "bom")
    invalid = decode_page(heapq.replace(b"heap", b"he\xff\xfeap", 3), "utf-8")   # mostly UTF-8, stray bytes
    assert "François Pinard" in invalid.text and "he\ufffd\ufffdapq" in invalid.text
    assert (invalid.charset, invalid.source, invalid.replaced) == ("utf-8", "http", 6)


def test_binary_is_undecodable_and_utf16_is_not_binary(site_dir):
    binary = pathlib.Path(sys.executable).read_bytes()[:65536]
    assert looks_binary(binary, "utf-8")
    with pytest.raises(Undecodable):
        decode_page(binary, "utf-8")
    text = page(site_dir, po_text("ja"))
    for body, label in ((text.encode("utf-16"), None), (text.encode("utf-16-le"), "UTF-16"),
                        (text.encode("utf-16-be"), "utf-16be")):
        assert not looks_binary(body, label)
        got = decode_page(body, label)
        assert got.text == text and got.source == ("bom" if label is None else "http")


def test_labels_map_as_browsers_map_them():
    expect = {"ISO-8859-1": "cp1252", "latin1": "cp1252", "US-ASCII": "cp1252", "windows-1252": "cp1252",
              "Shift_JIS": "cp932", "x-sjis": "cp932", "ms_kanji": "cp932", "windows-31j": "cp932",
              "gb2312": "gb18030", "GBK": "gb18030", "x-gbk": "gb18030", "euc-kr": "cp949",
              "ks_c_5601-1987": "cp949", "big5": "big5hkscs", "iso-8859-9": "cp1254", "tis-620": "cp874",
              "iso-8859-11": "cp874", "KOI8-R": "koi8-r", '"utf8"': "utf-8", "euc-jp": "euc_jp",
              "no-such-charset": None, "base64": None, "utf-7": None, "": None, None: None}
    assert {label: codec_for(label) for label in expect} == expect


def test_replacement_counts_do_not_mix_across_threads(site_dir):
    bodies = [damage(page(site_dir, TEXTS[name]()).encode(), seed, spots=1 + seed)
              for name in ("topics", "russian", "po-ja", "korean") for seed in range(6)]
    serial = [decode_page(b).replaced for b in bodies]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)                          # switch threads as often as possible
    try:
        with ThreadPoolExecutor(8) as pool:
            for _ in range(5):
                assert list(pool.map(lambda b: decode_page(b).replaced, bodies)) == serial
    finally:
        sys.setswitchinterval(interval)
