"""Rules the kernel printed: iptables-save text read back into `IptablesRule` values.

Rules of this room: pure, and only for text the kernel wrote. Our own rules
are values from the start and are never read back from their text; what is
read here is a rule found in the kernel that must be named again as a value
(a stale hook the iptc backend deletes by exact match) and the rule tables
tests write in iptables-save notation. A text is split the way iptables-save
quotes it, and every `--option` belongs to the `-m`/`-j`/`-g` before it.
"""

from __future__ import annotations

import re

from agent.vocab.rules import COMMENT_RE, IptablesRule, Match, Option, Target

# iptables-save quoting: a double-quoted token with backslash escapes, or a bare word.
TOKEN_RE = re.compile(r'"((?:[^"\\]|\\.)*)"|(\S+)')
UNESCAPE_RE = re.compile(r"\\(.)")
HEADER = {"-s": "src", "--source": "src", "-d": "dst", "--destination": "dst",
          "-i": "in_iface", "--in-interface": "in_iface",
          "-o": "out_iface", "--out-interface": "out_iface",
          "-p": "proto", "--protocol": "proto"}
FLAGS = {"-m": "-m", "--match": "-m", "-j": "-j", "--jump": "-j", "-g": "-g", "--goto": "-g"}
VERDICTS = frozenset({"ACCEPT", "DROP", "RETURN", "QUEUE"})


def tokenize(text: str) -> list[tuple[str, bool]]:
    """Split a rule as iptables-save quotes it: (text, was_quoted) pairs.

    Quotedness matters: a quoted token is always a value, even one that starts
    with `-` or is `!`. (shlex loses that, and keeps the backslash of the `\\'`
    iptables-save writes for a quote inside a comment.)
    """
    out = []
    for quoted, bare in TOKEN_RE.findall(text):  # a bare word is never empty
        if bare:
            out.append((bare, False))
        else:
            out.append((UNESCAPE_RE.sub(r"\1", quoted) if "\\" in quoted else quoted, True))
    return out


def parse_rule_text(text: str) -> IptablesRule:
    """The rule `text` (what follows `-A <chain> `) as a value; ValueError naming
    the token when it is not a rule iptables-save could have printed."""
    tokens = tokenize(text)
    header: dict[str, str] = {}
    negated: set[str] = set()
    parts: list[tuple[str, str, list[Option]]] = []   # (-m|-j|-g, name, options)
    negate = False
    i = 0
    while i < len(tokens):
        word, quoted = tokens[i]
        if quoted:
            raise ValueError(f"unexpected value {word!r}")
        i += 1
        if word == "!":
            if negate:
                raise ValueError("two '!' in a row")
            negate = True
            continue
        values = []
        while i < len(tokens) and (tokens[i][1] or tokens[i][0][0] not in "-!"):
            values.append(tokens[i][0])
            i += 1
        flag = FLAGS.get(word)
        if flag is None and word.startswith("--") and word not in HEADER:
            if not parts:
                raise ValueError(f"option {word} outside a -m match or -j target")
            parts[-1][2].append(Option(word, tuple(values), negate))
        elif len(values) != 1:
            raise ValueError(f"{word} takes one argument, got {values}")
        elif word in HEADER:
            header[HEADER[word]] = values[0]
            if negate:
                negated.add("-" + HEADER[word][0] if word.startswith("--") else word)
        elif flag is None:
            raise ValueError(f"unsupported option {word}")
        elif negate:
            raise ValueError(f"'!' cannot negate {word}")
        else:
            parts.append((flag, values[0], []))
        negate = False
    if negate:
        raise ValueError("'!' at the end")
    if not parts or parts[-1][0] == "-m" or any(p[0] != "-m" for p in parts[:-1]):
        raise ValueError("one -j/-g, after every -m")
    *matches, (flag, name, options) = parts
    comment = ""
    if matches and matches[0][1] == "comment" and len(matches[0][2]) == 1:
        only = matches[0][2][0]
        if only.flag == "--comment" and len(only.values) == 1 and not only.negated \
                and COMMENT_RE.match(only.values[0]):
            comment = only.values[0]
            matches = matches[1:]
    chain = flag == "-g" or (name not in VERDICTS and not options and not name.isupper())
    return IptablesRule(Target(name, flag == "-g", tuple(options), chain),
                        matches=tuple(Match(m, tuple(o)) for _, m, o in matches),
                        comment=comment, negated=frozenset(negated), **header)
