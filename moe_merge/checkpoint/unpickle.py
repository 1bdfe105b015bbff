"""A restricted pickle interpreter for checkpoint structures: data, never code.

``pickle.Unpickler`` with a ``find_class`` allowlist stops a pickle from calling a forbidden
global, but it still lets the pickle mutate what it has built: a BUILD opcode writes into the
``__dict__`` of any object on the stack (a storage record after its bounds were checked, a class,
a function's defaults), and an allowed callable can be called with any argument
(``bytearray(1_500_000_000)``). This module runs the opcodes itself, so that:

- only the callables in the caller's table are called, each with the arguments it is written for
  (the table's functions check their own arguments);
- BUILD applies only to the inert stand-in objects the pickle itself created (``NEWOBJ`` of an
  allowed class), never to records, tensors, classes or functions; the state of a dict (torch
  keeps ``_metadata`` there) is dropped; SETITEM(S), APPEND(S) and ADDITEMS apply only to plain
  dicts, lists and sets (every one on the stack was built by the pickle: the allowed globals
  are immutable markers and functions, and the callables return fresh objects);
- the cost is bounded: at most :data:`MAX_OBJECTS` objects and :data:`MAX_ELEMENTS` container
  elements (what an allowed callable or a BUILD copies counts too), integers of at most
  :data:`MAX_INT_BYTES` bytes, nesting at most :data:`MAX_DEPTH` deep (tuples as they are
  built, the rest at the end) and no cycles; dict keys and set items are text, bytes, bools,
  None, 64-bit integers or tuples of those, so no crafted hash collisions make them quadratic.

Any violation raises :class:`pickle.UnpicklingError` with a one-line reason. Opcodes no
checkpoint needs (INST, OBJ, EXT*, PERSID in text form, out-of-band buffers) are refused.
"""

from __future__ import annotations

import codecs
import collections
import pickle
import re
import struct
from collections.abc import Callable
from typing import Any

MAX_OBJECTS = 1 << 21  # containers, strings and instances built by one pickle
MAX_ELEMENTS = 1 << 23  # container items added (and memo / DUP references pushed) by one pickle
MAX_INT_BYTES = 16  # LONG1/LONG4 payloads (128-bit integers)
MAX_TEXT_INT = 40  # digits of a text-form INT / LONG
MAX_DEPTH = 64  # nesting of the loaded structure
MAX_MARKS = 1 << 10

Error = pickle.UnpicklingError


class Global:
    """A resolved allowed global: what REDUCE / NEWOBJ may do with it."""

    __slots__ = ("name", "call", "new")

    def __init__(self, name: str, call: Callable | None = None, new: type | None = None):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "call", call)
        object.__setattr__(self, "new", new)

    def __setattr__(self, key, value):
        raise AttributeError("read-only")

    def __repr__(self) -> str:
        return f"<{self.name}>"


class StandIn:
    """Base of the inert classes a pickle may instantiate with NEWOBJ and fill with BUILD (the
    DeepSpeed records of an optimizer file): their attributes are read after loading, checked by
    the reader like any other value."""


_KEYS = {str, bool, type(None), bytes}  # plus 64-bit ints and tuples (Interpreter._hashables)
_INT64 = (-(1 << 63), (1 << 63) - 1)
_DECIMAL = re.compile(rb"-?(0|[1-9][0-9]*)")
_WALK = {dict, collections.OrderedDict, list, tuple, set, frozenset}


class Interpreter:
    """Run one pickle. ``globals_``: ``(module, name) -> Global`` (anything else is refused);
    ``persistent_load``: called with BINPERSID's tuple, returns an immutable object."""

    def __init__(self, data: bytes, globals_: dict[tuple[str, str], Global],
                 persistent_load: Callable[[Any], Any]):
        self.data = bytes(data)
        self.globals = globals_
        self.persistent_load = persistent_load
        self.objects = 0
        self.elements = 0
        self.depth: dict[int, int] = {}  # id -> nesting of the tuples that hold tuples
        self.keep: list[tuple] = []

    # ---- bookkeeping ------------------------------------------------------------------
    def _new(self, obj):
        """Count an object the pickle builds. Every dict, list, set and stand-in on the stack is
        one: the allowed globals are immutable markers, names and functions, and the callables
        return fresh objects (through here)."""
        self.objects += 1
        if self.objects > MAX_OBJECTS:
            raise Error(f"more than {MAX_OBJECTS} objects: not a checkpoint structure")
        return obj

    @staticmethod
    def _container(obj, kinds: tuple, op: str):
        if type(obj) not in kinds:
            raise Error(f"{op} on a {type(obj).__name__}, not a container")
        return obj

    # ---- the loop ---------------------------------------------------------------------
    def load(self):
        """Run the pickle to its STOP; the object it returns."""
        try:
            return self._run()
        except (IndexError, struct.error):
            raise Error("pickle data was truncated or its stack is malformed") from None
        except KeyError as e:
            raise Error(f"memo key {str(e)[:20]} not found") from None

    def _run(self):  # one flat dispatch on the opcode, the most frequent first
        data, n = self.data, len(self.data)
        stack: list[Any] = []
        marks: list[list[Any]] = []
        memo: dict[int, Any] = {}
        push = stack.append
        u16, u32, i32, f64, u64 = (struct.Struct(f).unpack_from
                                   for f in ("<H", "<I", "<i", ">d", "<Q"))
        i = 0

        def line() -> bytes:  # text opcodes: up to the end of line
            nonlocal i
            j = data.find(b"\n", i, i + 4096)
            if j < 0:
                raise Error("pickle data was truncated (no end of line)")
            text, i = data[i:j], j + 1
            return text

        def string(k: int) -> bytes:
            nonlocal i
            if k < 0 or i + k > n:
                raise Error("pickle data was truncated (a string runs past its end)")
            raw, i = data[i:i + k], i + k
            return raw

        def pop_mark() -> list:
            nonlocal stack, push
            items = stack
            stack = marks.pop()
            push = stack.append
            return items

        def grow(k: int) -> None:
            self.elements += k
            if self.elements > MAX_ELEMENTS:
                raise Error(f"more than {MAX_ELEMENTS} container elements or references: not a "
                            "checkpoint structure")

        while True:
            op = data[i]
            i += 1
            if op == 0x4b:  # BININT1
                push(data[i])
                i += 1
            elif op == 0x71:  # BINPUT
                memo[data[i]] = stack[-1]
                i += 1
            elif op == 0x72:  # LONG_BINPUT
                if len(memo) >= MAX_OBJECTS:
                    raise Error("memo too large")
                memo[u32(data, i)[0]] = stack[-1]
                i += 4
            elif op == 0x28:  # MARK
                if len(marks) >= MAX_MARKS:
                    raise Error("too many nested MARKs")
                marks.append(stack)
                stack = []
                push = stack.append
            elif op in (0x58, 0x8c):  # BINUNICODE, SHORT_BINUNICODE
                if op == 0x58:
                    k = u32(data, i)[0]
                    i += 4
                else:
                    k = data[i]
                    i += 1
                try:
                    push(self._new(string(k).decode("utf-8", "surrogatepass")))
                except UnicodeDecodeError:
                    raise Error("bad UTF-8 string") from None
            elif op == 0x68:  # BINGET
                grow(1)
                push(memo[data[i]])
                i += 1
            elif op == 0x6a:  # LONG_BINGET
                grow(1)
                push(memo[u32(data, i)[0]])
                i += 4
            elif op == 0x5d:  # EMPTY_LIST
                push(self._new([]))
            elif op == 0x7d:  # EMPTY_DICT
                push(self._new({}))
            elif op == 0x65:  # APPENDS
                items = pop_mark()
                self._container(stack[-1], (list,), "APPENDS").extend(items)
                grow(len(items))
            elif op == 0x75:  # SETITEMS
                items = pop_mark()
                self._setitems(stack[-1], items)
            elif op == 0x74:  # TUPLE
                items = pop_mark()
                grow(len(items))
                push(self._tuple(items))
            elif op in (0x85, 0x86, 0x87):  # TUPLE1..3
                k = op - 0x84
                if len(stack) < k:
                    raise Error("TUPLE on a short stack")
                items = stack[-k:]
                del stack[-k:]
                grow(k)
                push(self._tuple(items))
            elif op == 0x29:  # EMPTY_TUPLE
                push(())
            elif op == 0x52:  # REDUCE
                args = stack.pop()
                push(self._call(stack.pop(), args))
            elif op == 0x4d:  # BININT2
                push(u16(data, i)[0])
                i += 2
            elif op == 0x4a:  # BININT
                push(i32(data, i)[0])
                i += 4
            elif op == 0x89:  # NEWFALSE
                push(False)
            elif op == 0x88:  # NEWTRUE
                push(True)
            elif op == 0x4e:  # NONE
                push(None)
            elif op == 0x47:  # BINFLOAT
                push(f64(data, i)[0])
                i += 8
            elif op == 0x61:  # APPEND
                item = stack.pop()
                self._container(stack[-1], (list,), "APPEND").append(item)
                grow(1)
            elif op == 0x73:  # SETITEM
                value = stack.pop()
                key = stack.pop()
                self._setitems(stack[-1], [key, value])
            elif op == 0x51:  # BINPERSID
                push(self.persistent_load(stack.pop()))
            elif op == 0x62:  # BUILD
                state = stack.pop()
                self._build(stack[-1], state)
            elif op in (0x81, 0x92):  # NEWOBJ, NEWOBJ_EX
                kwargs = stack.pop() if op == 0x92 else {}
                args = stack.pop()
                cls = stack.pop()
                if not isinstance(cls, Global) or cls.new is None:
                    raise Error(f"NEWOBJ of {_short(cls)}: not an allowed class")
                if args != () or kwargs != {}:
                    raise Error(f"NEWOBJ of {cls.name} with arguments")
                push(self._new(cls.new.__new__(cls.new)))
            elif op == 0x63:  # GLOBAL
                module = line().decode("utf-8", "replace")
                push(self._global(module, line().decode("utf-8", "replace")))
            elif op == 0x93:  # STACK_GLOBAL
                name = stack.pop()
                module = stack.pop()
                if not isinstance(module, str) or not isinstance(name, str):
                    raise Error("STACK_GLOBAL without two strings")
                push(self._global(module, name))
            elif op == 0x80:  # PROTO
                if data[i] > 5:
                    raise Error(f"unsupported pickle protocol {data[i]}")
                i += 1
            elif op == 0x95:  # FRAME
                u64(data, i)
                i += 8
            elif op == 0x2e:  # STOP
                if len(stack) != 1 or marks:
                    raise Error("STOP with a malformed stack")
                return stack[0]
            elif op == 0x94:  # MEMOIZE
                if len(memo) >= MAX_OBJECTS:
                    raise Error("memo too large")
                memo[len(memo)] = stack[-1]
            elif op == 0x30:  # POP
                if stack:
                    stack.pop()
                else:
                    pop_mark()
            elif op == 0x31:  # POP_MARK
                pop_mark()
            elif op == 0x32:  # DUP
                grow(1)
                push(stack[-1])
            elif op in (0x8a, 0x8b):  # LONG1, LONG4
                k = data[i] if op == 0x8a else i32(data, i)[0]
                i += 1 if op == 0x8a else 4
                if not 0 <= k <= MAX_INT_BYTES:
                    raise Error(f"integer of {k} bytes")
                push(int.from_bytes(string(k), "little", signed=True))
            elif op in (0x42, 0x43, 0x8e, 0x96, 0x54, 0x55, 0x8d):
                # BINBYTES, SHORT_BINBYTES, BINBYTES8, BYTEARRAY8, BINSTRING, SHORT_BINSTRING,
                # BINUNICODE8
                if op in (0x43, 0x55):
                    k = data[i]
                    i += 1
                elif op in (0x42, 0x54):
                    k = (u32 if op == 0x42 else i32)(data, i)[0]
                    i += 4
                else:
                    k = u64(data, i)[0]
                    i += 8
                raw = string(k)
                if op == 0x8d:
                    try:
                        value = raw.decode("utf-8", "surrogatepass")
                    except UnicodeDecodeError:
                        raise Error("bad UTF-8 string") from None
                elif op in (0x54, 0x55):
                    value = raw.decode("latin-1")  # protocol-2 str of Python 2: text here
                else:
                    value = bytearray(raw) if op == 0x96 else raw
                push(self._new(value))
            elif op == 0x8f:  # EMPTY_SET
                push(self._new(set()))
            elif op == 0x6c:  # LIST
                items = pop_mark()
                grow(len(items))
                push(self._new(items))
            elif op == 0x64:  # DICT
                items = pop_mark()
                d = self._new({})
                self._setitems(d, items)
                push(d)
            elif op == 0x91:  # FROZENSET
                items = pop_mark()
                grow(len(items))
                push(self._new(frozenset(self._hashables(items, "set item"))))
            elif op == 0x90:  # ADDITEMS
                items = pop_mark()
                target = self._container(stack[-1], (set,), "ADDITEMS")
                grow(len(items))
                target.update(self._hashables(items, "set item"))
            elif op in (0x49, 0x4c):  # INT, LONG (text)
                text = line().rstrip(b"L")
                push(text == b"01" if text in (b"00", b"01") else self._text_int(text))
            elif op == 0x46:  # FLOAT (text)
                text = line()
                if len(text) > MAX_TEXT_INT:
                    raise Error("text float too long")
                try:
                    push(float(text))
                except ValueError:
                    raise Error("bad text float") from None
            elif op in (0x53, 0x56):  # STRING, UNICODE (text)
                text = line()
                if op == 0x56:
                    value = text.decode("raw-unicode-escape")
                else:
                    if len(text) < 2 or text[0] != text[-1] or text[:1] not in (b"'", b'"'):
                        raise Error("bad text string")
                    value = codecs.escape_decode(text[1:-1])[0].decode("latin-1")
                push(self._new(value))
            elif op == 0x70:  # PUT (text)
                if len(memo) >= MAX_OBJECTS:
                    raise Error("memo too large")
                memo[self._text_int(line())] = stack[-1]
            elif op == 0x67:  # GET (text)
                grow(1)
                push(memo[self._text_int(line())])
            else:
                name = next((k for k, v in vars(pickle).items()
                             if k.isupper() and isinstance(v, bytes) and v == bytes([op])), None)
                raise Error(f"opcode {name or hex(op)} is not allowed in a checkpoint")

    # ---- helpers ----------------------------------------------------------------------
    @staticmethod
    def _text_int(line: bytes) -> int:
        """A decimal text integer; leading zeros (octal to C's strtol, which Python's own
        unpickler uses) and other bases are refused, so every reader sees one value."""
        if len(line) > MAX_TEXT_INT or not _DECIMAL.fullmatch(line):
            raise Error("bad text integer")
        return int(line)

    def _setitems(self, target, items: list) -> None:
        if len(items) % 2:
            raise Error("SETITEMS with an odd number of items")
        self._container(target, (dict, collections.OrderedDict), "SETITEM")
        self.elements += len(items) // 2
        if self.elements > MAX_ELEMENTS:
            raise Error(f"more than {MAX_ELEMENTS} container elements: not a checkpoint structure")
        keys = self._hashables(items[0::2], "dict key")
        for key, value in zip(keys, items[1::2]):
            target[key] = value

    def _tuple(self, items: list) -> tuple:
        """A tuple, its nesting tracked as it is built: hashing or printing a tuple nested a
        million deep would overflow the C stack before any later check could refuse it."""
        depth = 1 + max((self.depth.get(id(c), 1) for c in items if type(c) is tuple),
                        default=0)
        if depth > MAX_DEPTH:
            raise Error(f"nested deeper than {MAX_DEPTH} levels")
        t = self._new(tuple(items))
        if depth > 1:
            self.depth[id(t)] = depth
            self.keep.append(t)  # its id stays its own
        return t

    @staticmethod
    def _hashables(items, what: str) -> list:
        """``items`` if each is a key a checkpoint uses: text, bytes, a bool, None or a 64-bit
        integer, or a tuple of those (hash-flooding a dict or a set with crafted colliding
        integers or floats would make it quadratic)."""
        for x in items:
            kind = type(x)
            if kind is tuple:
                Interpreter._hashables(x, what)
            elif kind is int:
                if not _INT64[0] <= x <= _INT64[1]:
                    raise Error(f"{what}: an integer beyond 64 bits")
            elif kind not in _KEYS:
                raise Error(f"{what} of type {kind.__name__}")
        return list(items)

    def _global(self, module: str, name: str) -> Global:
        g = self.globals.get((module, name))
        if g is None:
            raise Error(f"Unsupported global: GLOBAL {module[:80]}.{name[:80]}")
        return g

    def _call(self, func, args):
        if not isinstance(func, Global) or func.call is None:
            raise Error(f"REDUCE of {func!r}: not an allowed callable")
        if not isinstance(args, tuple):
            raise Error(f"REDUCE of {func.name} with a {type(args).__name__} of arguments")
        try:
            result = func.call(*args)
            if isinstance(result, (str, bytes, bytearray, tuple, list, dict, set, frozenset)):
                self.elements += len(result)  # a copy of the argument: counted like one built
                if self.elements > MAX_ELEMENTS:
                    raise Error(f"more than {MAX_ELEMENTS} container elements: not a "
                                "checkpoint structure")
        except Error:
            raise
        except (TypeError, ValueError, OverflowError, KeyError, IndexError) as e:
            raise Error(f"{func.name}{_short(args)}: {e}") from None
        return self._new(result)

    def _build(self, target, state) -> None:
        if isinstance(target, StandIn):
            if isinstance(state, tuple) and len(state) == 2:
                state, slots = state
                if slots is not None:
                    raise Error("BUILD with slot state")
            if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
                raise Error(f"BUILD of {type(target).__name__} with a non-dict state")
            self.elements += len(state)
            if self.elements > MAX_ELEMENTS:
                raise Error(f"more than {MAX_ELEMENTS} container elements: not a checkpoint "
                            "structure")
            target.__dict__.update(state)
        elif type(target) in (dict, collections.OrderedDict):
            # torch keeps a state dict's _metadata (per-module versions) here: not needed, dropped
            if not isinstance(state, dict):
                raise Error("BUILD of a dict with a non-dict state")
        else:
            raise Error(f"BUILD on a {type(target).__name__}: only objects the pickle built "
                        "may be given state")

    def check_shape(self, root) -> None:
        """Refuse cycles and nesting deeper than :data:`MAX_DEPTH` (iteratively)."""
        todo = [(root, 0, False)]
        open_: set[int] = set()
        done: set[int] = set()
        while todo:
            obj, depth, leaving = todo.pop()
            if leaving:
                open_.discard(id(obj))
                done.add(id(obj))
                continue
            if isinstance(obj, dict):
                children = [*obj.keys(), *obj.values()]
            elif isinstance(obj, (list, tuple, set, frozenset)):
                children = obj
            elif isinstance(obj, StandIn):
                children = list(obj.__dict__.values())
            else:
                continue
            key = id(obj)
            if key in open_:
                raise Error("the structure contains itself (a cycle)")
            if key in done:
                continue
            if depth >= MAX_DEPTH:
                raise Error(f"nested deeper than {MAX_DEPTH} levels")
            open_.add(key)
            todo.append((obj, depth, True))
            todo.extend((c, depth + 1, False) for c in children
                        if type(c) in _WALK or isinstance(c, StandIn))


def _short(args) -> str:
    text = repr(args)
    return text if len(text) <= 60 else text[:57] + "..."


def loads(data: bytes, globals_: dict[tuple[str, str], Global],
          persistent_load: Callable[[Any], Any]):
    """The object the pickle ``data`` describes (see the module docstring for the rules)."""
    vm = Interpreter(data, globals_, persistent_load)
    obj = vm.load()
    vm.check_shape(obj)
    return obj
