"""A tiny renderer of Go templates (Ollama's template language), for exactly the constructs
engine/ollama.py emits: text, `{{-`/`-}}` trimming, quoted strings, `.Content`/`.Role`,
`range $i, $_ := .Messages`, `if`/`else if`/`end` with `eq`, `ne`, `and` and parentheses.
Anything else raises, so a template that uses more than this cannot pass a test by accident."""

from __future__ import annotations

import json
import re

ACTION = re.compile(r'\{\{(-?)\s*((?:"(?:\\.|[^"\\])*"|[^"}])*?)\s*(-?)\}\}', re.S)
TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\(|\)|[^\s()]+')


def render(template: str, messages: list[dict]) -> str:
    nodes = _lex(template)
    tree, rest = _parse(nodes, 0)
    assert rest == len(nodes), "unbalanced end"
    return _run(tree, {"Messages": messages}, {})


def _lex(template: str) -> list:
    """Text (trimmed where an action says `{{-` or `-}}`) and ("action", words), alternating."""
    nodes, at, trim_next = [], 0, False
    for match in ACTION.finditer(template):
        text = template[at:match.start()]
        text = text.lstrip() if trim_next else text
        nodes += [text.rstrip() if match[1] else text, ("action", match[2])]
        trim_next, at = bool(match[3]), match.end()
    tail = template[at:]
    nodes.append(tail.lstrip() if trim_next else tail)
    return nodes


def _parse(nodes: list, at: int, stop=("end",)):
    """A list of items until an action starting with a word in stop; returns (items, index)."""
    items = []
    while at < len(nodes):
        node = nodes[at]
        if isinstance(node, str):
            items.append(("text", node))
            at += 1
            continue
        words = node[1]
        first = words.split(" ", 1)[0]
        if first in stop:
            return items, at
        if first == "range":
            body, at = _parse(nodes, at + 1)
            items.append(("range", words[len("range"):].strip(), body))
            at += 1  # the end
        elif first == "if":
            branches, at = _parse_if(nodes, at, words[len("if"):].strip())
            items.append(("if", branches))
        else:
            items.append(("value", words))
            at += 1
    return items, at


def _parse_if(nodes: list, at: int, condition: str):
    branches = []
    while True:
        body, at = _parse(nodes, at + 1, stop=("end", "else"))
        branches.append((condition, body))
        words = nodes[at][1]
        if words == "end":
            return branches, at + 1
        if words.startswith("else if "):
            condition = words[len("else if "):]
        elif words == "else":
            condition = "true"
        else:
            raise AssertionError(f"unsupported: {words}")


def _run(items: list, dot, variables: dict) -> str:
    out = []
    for item in items:
        if item[0] == "text":
            out.append(item[1])
        elif item[0] == "value":
            out.append(str(_evaluate(TOKEN.findall(item[1]), dot, variables)))
        elif item[0] == "if":
            for condition, body in item[1]:
                if condition == "true" or _evaluate(TOKEN.findall(condition), dot, variables):
                    out.append(_run(body, dot, variables))
                    break
        elif item[0] == "range":
            match = re.fullmatch(r"\$(\w+), \$_ := \.Messages", item[1])
            assert match, f"unsupported range: {item[1]}"
            for index, message in enumerate(dot["Messages"]):
                out.append(_run(item[2], message, {**variables, match[1]: index}))
    return "".join(out)


def _evaluate(tokens: list[str], dot, variables: dict):
    value, rest = _expression(tokens, dot, variables)
    assert not rest, f"unsupported: {tokens}"
    return value


def _expression(tokens: list[str], dot, variables: dict):
    head, rest = tokens[0], tokens[1:]
    if head in ("eq", "ne", "and"):
        left, rest = _operand(rest, dot, variables)
        right, rest = _operand(rest, dot, variables)
        value = {"eq": left == right, "ne": left != right, "and": bool(left and right)}[head]
        return value, rest
    return _operand(tokens, dot, variables)


def _operand(tokens: list[str], dot, variables: dict):
    head, rest = tokens[0], tokens[1:]
    if head == "(":
        depth, end = 0, 0
        for end, token in enumerate(tokens):
            depth += {"(": 1, ")": -1}.get(token, 0)
            if depth == 0:
                break
        return _evaluate(tokens[1:end], dot, variables), tokens[end + 1:]
    if head.startswith('"'):
        return json.loads(head), rest
    if head.startswith("$"):
        return variables[head[1:]], rest
    if head.startswith("."):
        return dot[head[1:].lower()], rest
    if head.isdigit():
        return int(head), rest
    raise AssertionError(f"unsupported operand: {head}")
