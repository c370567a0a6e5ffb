"""Lexer and parser of Go's text/template, as package text/template/parse reads a template.

The grammar, the trim markers (``{{- `` and `` -}}``), the keywords and the parse errors follow
Go's own (go/src/text/template/parse), so a template docker accepts parses here and one it refuses
fails with the same message: ``template: NAME:LINE: MESSAGE``. The parse checks Go makes before
execution are made here too: an undefined function or variable, a constant in a later pipeline
stage, ``{{else}}`` or ``{{end}}`` out of place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from lamina.gotemplate.lex import Lexer, ParseError, Token, go_quote, go_unquote

__all__ = ["Lexer", "ParseError", "Token", "go_quote", "go_unquote"]


# --- nodes ---------------------------------------------------------------------------------------
# Each node keeps its byte offset for Go's error location ("NAME:LINE:COL") and prints itself as
# Go's Node.String() does, for the "<...>" context of an execution error.


@dataclass
class Node:
    pos: int

    def __str__(self) -> str:
        raise NotImplementedError


@dataclass
class TextNode(Node):
    text: str

    def __str__(self) -> str:
        return go_quote(self.text)


@dataclass
class DotNode(Node):
    def __str__(self) -> str:
        return "."


@dataclass
class NilNode(Node):
    def __str__(self) -> str:
        return "nil"


@dataclass
class BoolNode(Node):
    value: bool

    def __str__(self) -> str:
        return "true" if self.value else "false"


@dataclass
class NumberNode(Node):
    text: str
    value: int | float
    is_int: bool

    def __str__(self) -> str:
        return self.text


@dataclass
class StringNode(Node):
    quoted: str
    text: str

    def __str__(self) -> str:
        return self.quoted


@dataclass
class IdentifierNode(Node):
    name: str

    def __str__(self) -> str:
        return self.name


@dataclass
class FieldNode(Node):
    idents: list[str]

    def __str__(self) -> str:
        return "".join("." + i for i in self.idents)


@dataclass
class VariableNode(Node):
    idents: list[str]  # "$x" then fields

    def __str__(self) -> str:
        return ".".join(self.idents)


@dataclass
class ChainNode(Node):
    node: Node
    fields: list[str]

    def __str__(self) -> str:
        text = f"({self.node})" if isinstance(self.node, PipeNode) else str(self.node)
        return text + "".join("." + f for f in self.fields)


@dataclass
class CommandNode(Node):
    args: list[Node] = field(default_factory=list)

    def __str__(self) -> str:
        return " ".join(f"({a})" if isinstance(a, PipeNode) else str(a) for a in self.args)


@dataclass
class PipeNode(Node):
    decl: list[VariableNode] = field(default_factory=list)
    is_assign: bool = False
    cmds: list[CommandNode] = field(default_factory=list)

    def __str__(self) -> str:
        text = ""
        if self.decl:
            text = ", ".join(str(v) for v in self.decl) + (" = " if self.is_assign else " := ")
        return text + " | ".join(str(c) for c in self.cmds)


@dataclass
class ListNode(Node):
    nodes: list[Node] = field(default_factory=list)

    def __str__(self) -> str:
        return "".join(str(n) for n in self.nodes)


@dataclass
class ActionNode(Node):
    pipe: PipeNode

    def __str__(self) -> str:
        return "{{" + str(self.pipe) + "}}"


@dataclass
class BranchNode(Node):
    keyword: str  # if, range, with
    pipe: PipeNode
    body: ListNode
    else_body: ListNode | None

    def __str__(self) -> str:
        text = "{{" + self.keyword + " " + str(self.pipe) + "}}" + str(self.body)
        if self.else_body is not None:
            text += "{{else}}" + str(self.else_body)
        return text + "{{end}}"


@dataclass
class TemplateNode(Node):
    name: str
    pipe: PipeNode | None

    def __str__(self) -> str:
        if self.pipe is None:
            return "{{template " + go_quote(self.name) + "}}"
        return "{{template " + go_quote(self.name) + " " + str(self.pipe) + "}}"


@dataclass
class LoopControlNode(Node):
    keyword: str  # break, continue

    def __str__(self) -> str:
        return "{{" + self.keyword + "}}"


@dataclass
class _EndNode(Node):
    keyword: str  # end, else

    def __str__(self) -> str:
        return "{{" + self.keyword + "}}"


# --- parser --------------------------------------------------------------------------------------


def parse_number(token: Token) -> tuple[int | float, bool]:
    """(value, is_int) of a number or character constant, as parse.newNumber reads it."""
    text = token.value
    if token.kind == "char":
        return ord(go_unquote(text)), True
    if text.endswith("i"):
        raise ValueError(text)
    body = text.replace("_", "")
    sign = -1 if body.startswith("-") else 1
    unsigned = body.lstrip("+-")
    try:
        if unsigned[:2].lower() in ("0x", "0o", "0b") and not any(c in unsigned[2:] for c in ".pP"):
            return sign * int(unsigned, 0), True
        if unsigned.isdigit():
            return sign * int(unsigned, 8 if len(unsigned) > 1 and unsigned.startswith("0") else 10), True
        value = sign * (float.fromhex(unsigned) if unsigned[:2].lower() == "0x" else float(unsigned))
    except ValueError:
        raise ValueError(text) from None
    if value == int(value) and abs(value) < 2 ** 63 and not any(c in unsigned for c in ".eEpP"):
        return int(value), True
    return value, False


class Parser:
    """parse.Tree: a template's text into named trees (the main one and each {{define}})."""

    def __init__(self, text: str, name: str, functions: Callable[[str], bool]) -> None:
        self.text = text
        self.name = name
        self.has_function = functions
        self.tokens = Lexer(text, name).run()
        self.index = 0
        self.vars: list[str] = ["$"]
        self.range_depth = 0
        self.line = 0
        self.trees: dict[str, ListNode] = {}

    def error(self, message: str) -> ParseError:
        line = self.line or self.tokens[max(self.index - 1, 0)].line
        return ParseError(f"template: {self.name}:{line}: {message}")

    def unexpected(self, token: Token, context: str) -> ParseError:
        if token.kind == "error":
            extra = ""
            if self.line and self.line != token.line:
                extra = f" in action started at {self.name}:{self.line}"
            return ParseError(f"template: {self.name}:{token.line}: {token.value}{extra}")
        return self.error(f"unexpected {token.describe()} in {context}")

    def next(self) -> Token:
        """The next token; past the last (eof or error) the last again, as Go's lexer repeats it."""
        token = self.tokens[min(self.index, len(self.tokens) - 1)]
        self.index += 1
        return token

    def peek(self) -> Token:
        return self.tokens[min(self.index, len(self.tokens) - 1)]

    def next_non_space(self) -> Token:
        token = self.next()
        while token.kind == "space":
            token = self.next()
        return token

    def peek_non_space(self) -> Token:
        """The next token that is not a space, which stays next (spaces before it are skipped)."""
        while self.peek().kind == "space":
            self.index += 1
        return self.peek()

    def expect(self, kind: str, context: str) -> Token:
        token = self.next_non_space()
        if token.kind != kind:
            raise self.unexpected(token, context)
        return token

    # -- templates --

    def parse(self) -> dict[str, ListNode]:
        root = ListNode(self.peek().pos)
        while self.peek().kind != "eof":
            if self.peek().kind == "left":
                mark = self.index
                self.next()
                if self.next_non_space().value == "define" and self.tokens[self.index - 1].kind == "keyword":
                    self.parse_definition()
                    continue
                self.index = mark
            node = self.text_or_action()
            if isinstance(node, _EndNode):
                raise self.error(f"unexpected {node}")
            root.nodes.append(node)
        self.add_tree(self.name, root)
        return self.trees

    def add_tree(self, name: str, root: ListNode) -> None:
        """parse.Tree.add: a second non-empty definition of a name in one text is an error."""
        existing = self.trees.get(name)
        if existing is None or _is_empty(existing):
            self.trees[name] = root
        elif not _is_empty(root):
            raise self.error(f"template: multiple definition of template {go_quote(name)}")

    def parse_definition(self) -> None:
        context = "define clause"
        name = self.template_name(self.next_non_space(), context)
        self.expect("right", context)
        saved_vars, self.vars = self.vars, ["$"]
        body, end = self.item_list()
        self.vars = saved_vars
        if not (isinstance(end, _EndNode) and end.keyword == "end"):
            raise self.error(f"unexpected {end} in {context}")
        self.add_tree(name, body)

    def template_name(self, token: Token, context: str) -> str:
        if token.kind not in ("string", "rawstring"):
            raise self.unexpected(token, context)
        return self.unquote(token)

    def unquote(self, token: Token) -> str:
        if token.kind == "rawstring":
            return token.value[1:-1].replace("\r", "")
        try:
            return go_unquote(token.value)
        except ValueError:
            raise self.error("invalid syntax") from None

    def item_list(self) -> tuple[ListNode, Node]:
        body = ListNode(self.peek_non_space().pos)
        while self.peek_non_space().kind != "eof":
            node = self.text_or_action()
            if isinstance(node, _EndNode):
                return body, node
            body.nodes.append(node)
        raise self.error("unexpected EOF")

    def text_or_action(self) -> Node:
        token = self.next_non_space()
        if token.kind == "text":
            return TextNode(token.pos, token.value)
        if token.kind == "left":
            self.line = token.line
            try:
                return self.action()
            finally:
                self.line = 0
        raise self.unexpected(token, "input")

    # -- actions --

    def action(self) -> Node:
        token = self.next_non_space()
        if token.kind == "keyword":
            keyword = token.value
            if keyword in ("if", "range", "with"):
                return self.control(keyword, token)
            if keyword in ("break", "continue"):
                after = self.next_non_space()
                if after.kind != "right":
                    raise self.unexpected(after, "{{" + keyword + "}}")
                if self.range_depth == 0:
                    raise self.error("{{" + keyword + "}} outside {{range}}")
                return LoopControlNode(token.pos, keyword)
            if keyword == "else":
                peek = self.peek_non_space()
                if peek.kind == "keyword" and peek.value in ("if", "with"):
                    return _EndNode(peek.pos, "else")
                return _EndNode(self.expect("right", "else").pos, "else")
            if keyword == "end":
                return _EndNode(self.expect("right", "end").pos, "end")
            if keyword == "template":
                return self.template_control()
            if keyword == "block":
                return self.block_control()
        self.index -= 1
        start = self.peek()
        return ActionNode(start.pos, self.pipeline("command", "right"))

    def control(self, keyword: str, token: Token) -> BranchNode:
        saved = len(self.vars)
        try:
            pipe = self.pipeline(keyword, "right")
            if keyword == "range":
                self.range_depth += 1
            body, end = self.item_list()
            if keyword == "range":
                self.range_depth -= 1
            else_body: ListNode | None = None
            if isinstance(end, _EndNode) and end.keyword == "else":
                peek = self.peek()
                if keyword in ("if", "with") and peek.kind == "keyword" and peek.value == keyword:
                    nested = self.next()
                    else_body = ListNode(end.pos, [self.control(keyword, nested)])
                else:
                    else_body, end = self.item_list()
                    if not (isinstance(end, _EndNode) and end.keyword == "end"):
                        raise self.error(f"expected end; found {end}")
            return BranchNode(pipe.pos, keyword, pipe, body, else_body)
        finally:
            del self.vars[saved:]

    def template_control(self) -> TemplateNode:
        context = "template clause"
        token = self.next_non_space()
        name = self.template_name(token, context)
        pipe = None
        if self.next_non_space().kind != "right":
            self.index -= 1
            pipe = self.pipeline(context, "right")
        return TemplateNode(token.pos, name, pipe)

    def block_control(self) -> TemplateNode:
        context = "block clause"
        token = self.next_non_space()
        name = self.template_name(token, context)
        pipe = self.pipeline(context, "right")
        saved_vars, self.vars = self.vars, ["$"]
        body, end = self.item_list()
        self.vars = saved_vars
        if not (isinstance(end, _EndNode) and end.keyword == "end"):
            raise self.error(f"unexpected {end} in {context}")
        self.add_tree(name, body)
        return TemplateNode(token.pos, name, pipe)

    # -- pipelines --

    def pipeline(self, context: str, end: str) -> PipeNode:
        pipe = PipeNode(self.peek_non_space().pos)
        self.declarations(pipe, context)
        while True:
            token = self.next_non_space()
            if token.kind == end:
                self.check_pipeline(pipe, context)
                return pipe
            if token.kind in ("bool", "char", "dot", "field", "identifier", "number", "nil", "rawstring",
                              "string", "variable", "lparen"):
                self.index -= 1
                pipe.cmds.append(self.command())
            else:
                raise self.unexpected(token, context)

    def declarations(self, pipe: PipeNode, context: str) -> None:
        while self.peek_non_space().kind == "variable":
            mark = self.index
            variable = self.next_non_space()
            after = self.next_non_space()
            if after.kind in ("assign", "declare"):
                pipe.is_assign = after.kind == "assign"
                pipe.decl.append(VariableNode(variable.pos, [variable.value]))
                self.vars.append(variable.value)
                return
            if after.kind == "punctuation" and after.value == ",":
                pipe.decl.append(VariableNode(variable.pos, [variable.value]))
                self.vars.append(variable.value)
                if context == "range" and len(pipe.decl) < 2:
                    if self.peek_non_space().kind in ("variable", "right", "rparen"):
                        continue
                    raise self.error("range can only initialize variables")
                raise self.error(f"too many declarations in {context}")
            self.index = mark
            return

    def check_pipeline(self, pipe: PipeNode, context: str) -> None:
        if not pipe.cmds:
            raise self.error(f"missing value for {context}")
        for stage, cmd in enumerate(pipe.cmds[1:], start=2):
            if isinstance(cmd.args[0], (BoolNode, DotNode, NilNode, NumberNode, StringNode)):
                raise self.error(f"non executable command in pipeline stage {stage}")

    def command(self) -> CommandNode:
        cmd = CommandNode(self.peek_non_space().pos)
        while True:
            self.peek_non_space()
            operand = self.operand()
            if operand is not None:
                cmd.args.append(operand)
            token = self.next()
            if token.kind == "space":
                continue
            if token.kind in ("right", "rparen"):
                self.index -= 1
            elif token.kind != "pipe":
                raise self.unexpected(token, "operand")
            break
        if not cmd.args:
            raise self.error("empty command")
        return cmd

    def operand(self) -> Node | None:
        node = self.term()
        if node is None or self.peek().kind != "field":
            return node
        chain_pos = self.peek().pos
        fields: list[str] = []
        while self.peek().kind == "field":
            fields.append(self.next().value[1:])
        if isinstance(node, FieldNode):
            return FieldNode(chain_pos, node.idents + fields)
        if isinstance(node, VariableNode):
            return VariableNode(chain_pos, node.idents + fields)
        if isinstance(node, (BoolNode, StringNode, NumberNode, NilNode, DotNode)):
            raise self.error(f"unexpected . after term {go_quote(str(node))}")
        return ChainNode(chain_pos, node, fields)

    def term(self) -> Node | None:
        token = self.next_non_space()
        kind = token.kind
        if kind == "identifier":
            if not self.has_function(token.value):
                raise self.error(f"function {go_quote(token.value)} not defined")
            return IdentifierNode(token.pos, token.value)
        if kind == "dot":
            return DotNode(token.pos)
        if kind == "nil":
            return NilNode(token.pos)
        if kind == "variable":
            name, *fields = token.value.split(".")
            if name not in self.vars:
                raise self.error(f"undefined variable {go_quote(name)}")
            return VariableNode(token.pos, [name, *fields])
        if kind == "field":
            return FieldNode(token.pos, [token.value[1:]])
        if kind == "bool":
            return BoolNode(token.pos, token.value == "true")
        if kind in ("number", "char"):
            try:
                value, is_int = parse_number(token)
            except ValueError:
                raise self.error(f"illegal number syntax: {go_quote(token.value)}") from None
            return NumberNode(token.pos, token.value, value, is_int)
        if kind == "lparen":
            return self.pipeline("parenthesized pipeline", "rparen")
        if kind in ("string", "rawstring"):
            return StringNode(token.pos, token.value, self.unquote(token))
        self.index -= 1
        return None


def _is_empty(node: Node) -> bool:
    if isinstance(node, ListNode):
        return all(_is_empty(n) for n in node.nodes)
    return isinstance(node, TextNode) and not node.text.strip()


def parse(text: str, name: str, has_function: Callable[[str], bool]) -> dict[str, ListNode]:
    """Every tree of ``text``: the main template under ``name`` and each {{define}}/{{block}}."""
    return Parser(text, name, has_function).parse()


def walk(node: Node) -> Iterator[Node]:
    """Every node under ``node``, depth first."""
    yield node
    children: list[Node] = []
    if isinstance(node, ListNode):
        children = list(node.nodes)
    elif isinstance(node, BranchNode):
        children = [node.pipe, node.body] + ([node.else_body] if node.else_body else [])
    elif isinstance(node, (ActionNode,)):
        children = [node.pipe]
    elif isinstance(node, PipeNode):
        children = list(node.cmds)
    elif isinstance(node, CommandNode):
        children = list(node.args)
    for child in children:
        yield from walk(child)
