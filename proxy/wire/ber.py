"""A small BER codec for the LDAP front end: framing, limits, and the few
messages the proxy reads or writes itself. No I/O.

Written by hand rather than with ldaptor's decoder for two reasons:

- limits come first. ldaptor buffers until a message is complete and
  decodes it recursively, so a length header of 4 GiB grows memory and a
  deeply nested message exhausts the stack. Here the length is checked from
  the header, before any of the body is kept, and the nesting is measured
  without recursion;
- most messages are not decoded at all. After a bind, requests and answers
  are relayed as bytes; only the message id and the operation's tag are
  read. Binds, extended requests and the answers the proxy gives are the
  only messages it builds or takes apart, and they are small.
"""

from __future__ import annotations

import functools

import attrs

# Operation tags (RFC 4511), [APPLICATION n], constructed unless noted.
BIND_REQUEST = 0x60
BIND_RESPONSE = 0x61
UNBIND_REQUEST = 0x42  # primitive
SEARCH_REQUEST = 0x63
SEARCH_RESULT_DONE = 0x65
MODIFY_REQUEST = 0x66
ADD_REQUEST = 0x68
DEL_REQUEST = 0x4A  # primitive
MODIFY_DN_REQUEST = 0x6C
COMPARE_REQUEST = 0x6E
ABANDON_REQUEST = 0x50  # primitive
EXTENDED_REQUEST = 0x77
EXTENDED_RESPONSE = 0x78

RESPONSE_TAG = {
    BIND_REQUEST: BIND_RESPONSE,
    SEARCH_REQUEST: SEARCH_RESULT_DONE,
    MODIFY_REQUEST: 0x67,
    ADD_REQUEST: 0x69,
    DEL_REQUEST: 0x6B,
    MODIFY_DN_REQUEST: 0x6D,
    COMPARE_REQUEST: 0x6F,
    EXTENDED_REQUEST: EXTENDED_RESPONSE,
}
WRITE_REQUESTS = frozenset({MODIFY_REQUEST, ADD_REQUEST, DEL_REQUEST, MODIFY_DN_REQUEST})
# The responses shaped as an LDAPResult (RFC 4511 4.1.9).
RESULTS = frozenset(RESPONSE_TAG.values())

SEQUENCE = 0x30
INTEGER = 0x02
OCTET_STRING = 0x04
ENUMERATED = 0x0A

SEARCH_RESULT_ENTRY = 0x64
SEARCH_RESULT_REFERENCE = 0x73
CONTROLS = 0xA0  # [0] Controls, in an LDAPMessage
BOOLEAN = 0x01

START_TLS = "1.3.6.1.4.1.1466.20037"
# RFC 4370's proxied authorization control, and the draft version before it.
PROXIED_AUTHORIZATION = "2.16.840.1.113730.3.4.18"
PROXIED_AUTHORIZATION_V1 = "2.16.840.1.113730.3.4.12"
WHO_AM_I = "1.3.6.1.4.1.4203.1.11.3"
NOTICE_OF_DISCONNECTION = "1.3.6.1.4.1.1466.20036"

# Result codes (RFC 4511 appendix A).
SUCCESS = 0
OPERATIONS_ERROR = 1
PROTOCOL_ERROR = 2
AUTH_METHOD_NOT_SUPPORTED = 7
CONFIDENTIALITY_REQUIRED = 13
INAPPROPRIATE_AUTHENTICATION = 48
INVALID_CREDENTIALS = 49
INSUFFICIENT_ACCESS_RIGHTS = 50
BUSY = 51
UNAVAILABLE = 52
UNAVAILABLE_CRITICAL_EXTENSION = 12
UNWILLING_TO_PERFORM = 53
REFERRAL = 10
NO_SUCH_OBJECT = 32
AUTHORIZATION_DENIED = 123


class BERError(Exception):
    """Bytes that are not a well-formed LDAP message."""


class TooLarge(BERError):
    """A message longer than the limit in force."""


def _header(data: bytes | bytearray | memoryview, offset: int,
            end: int) -> tuple[int, int, int] | None:
    """(tag, length, offset of the value) of the element at ``offset``, or
    None if ``data[:end]`` does not hold the whole header yet."""
    if offset >= end:
        return None
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise BERError("multi-byte tags do not occur in LDAP")
    if offset + 1 >= end:
        return None
    first = data[offset + 1]
    if first < 0x80:
        return tag, first, offset + 2
    count = first & 0x7F
    if count == 0:
        raise BERError("indefinite lengths are not allowed in LDAP")
    if count > 4:
        raise TooLarge("a length of more than 4 bytes")
    if offset + 2 + count > end:
        return None
    length = int.from_bytes(data[offset + 2 : offset + 2 + count], "big")
    return tag, length, offset + 2 + count


def check_depth(frame: bytes, max_depth: int) -> None:
    """Walk every element of ``frame`` without recursion: lengths must nest
    exactly, and constructed elements no deeper than ``max_depth``."""
    ends: list[int] = []  # where each open constructed element ends
    offset = 0
    while offset < len(frame):
        container_end = ends[-1] if ends else len(frame)
        header = _header(frame, offset, container_end)
        if header is None:
            raise BERError("an element runs past its container")
        tag, length, start = header
        end = start + length
        if end > container_end:
            raise BERError("an element runs past its container")
        if tag & 0x20:
            ends.append(end)
            if len(ends) > max_depth:
                raise BERError(f"nested more than {max_depth} deep")
            offset = start
        else:
            offset = end
        while ends and offset == ends[-1]:
            ends.pop()


class Framer:
    """Cuts a byte stream into whole LDAP messages, refusing oversized ones
    from their header, before their body is kept."""

    def __init__(self, max_size: int, max_depth: int = 32) -> None:
        self.max_size = max_size
        self.max_depth = max_depth
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames = []
        while True:
            header = _header(self._buffer, 0, len(self._buffer))
            if header is None:
                if len(self._buffer) > 6:
                    raise BERError("a header longer than any length allows")
                break
            tag, length, start = header
            if tag != SEQUENCE:
                raise BERError("an LDAP message must be a SEQUENCE")
            if start + length > self.max_size:
                raise TooLarge(f"a message of {start + length} bytes")
            if len(self._buffer) < start + length:
                break
            frame = bytes(self._buffer[: start + length])
            del self._buffer[: start + length]
            check_depth(frame, self.max_depth)
            frames.append(frame)
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buffer)


# -- reading -----------------------------------------------------------------------


@attrs.frozen
class Message:
    """An LDAP message, read only as far as routing needs."""

    id: int
    op_tag: int
    op_start: int  # where the operation's value starts in the frame
    op_end: int
    frame: bytes = attrs.field(repr=False)

    @property
    def op(self) -> bytes:
        return self.frame[self.op_start : self.op_end]


def _element(data: bytes, offset: int, end: int) -> tuple[int, int, int]:
    header = _header(data, offset, end)
    if header is None:
        raise BERError("truncated")
    tag, length, start = header
    if start + length > end:
        raise BERError("truncated")
    return tag, start, start + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    while start < end:
        tag, value_start, value_end = _element(data, start, end)
        out.append((tag, value_start, value_end))
        start = value_end
    return out


def _integer(data: bytes) -> int:
    if not 1 <= len(data) <= 4:
        raise BERError("an integer out of range")
    return int.from_bytes(data, "big", signed=True)


def parse_message(frame: bytes) -> Message:
    tag, start, end = _element(frame, 0, len(frame))
    parts = _children(frame, start, end)
    if len(parts) < 2 or parts[0][0] != INTEGER:
        raise BERError("an LDAP message needs an id and an operation")
    id = _integer(frame[parts[0][1] : parts[0][2]])
    if id < 0:
        raise BERError("a negative message id")
    op_tag, op_start, op_end = parts[1]
    return Message(id, op_tag, op_start, op_end, frame)


@attrs.frozen
class Bind:
    version: int
    name: bytes
    password: bytes | None = attrs.field(repr=False)  # None for SASL
    mechanism: bytes | None = None


def parse_bind(message: Message) -> Bind:
    if message.op_tag != BIND_REQUEST:
        raise BERError("not a bind request")
    data = message.frame
    parts = _children(data, message.op_start, message.op_end)
    if len(parts) != 3 or parts[0][0] != INTEGER or parts[1][0] != OCTET_STRING:
        raise BERError("a malformed bind request")
    version = _integer(data[parts[0][1] : parts[0][2]])
    name = data[parts[1][1] : parts[1][2]]
    tag, start, end = parts[2]
    if tag == 0x80:  # [0] simple
        return Bind(version, name, data[start:end])
    if tag == 0xA3:  # [3] SaslCredentials
        inner = _children(data, start, end)
        if not inner or inner[0][0] != OCTET_STRING:
            raise BERError("malformed SASL credentials")
        return Bind(version, name, None, data[inner[0][1] : inner[0][2]])
    raise BERError("an unknown authentication choice")


@attrs.frozen
class Extended:
    name: str
    value: bytes | None = attrs.field(repr=False, default=None)


def parse_extended(message: Message) -> Extended:
    if message.op_tag != EXTENDED_REQUEST:
        raise BERError("not an extended request")
    data = message.frame
    parts = _children(data, message.op_start, message.op_end)
    if not parts or parts[0][0] != 0x80:
        raise BERError("an extended request without a name")
    name = data[parts[0][1] : parts[0][2]].decode("ascii", "replace")
    value = None
    if len(parts) > 1 and parts[1][0] == 0x81:
        value = data[parts[1][1] : parts[1][2]]
    return Extended(name, value)


def control_types(message: Message) -> list[str]:
    """The OIDs of the controls a message carries (RFC 4511 4.1.11)."""
    data = message.frame
    _, start, end = _element(data, 0, len(data))
    parts = _children(data, start, end)
    if len(parts) < 3 or parts[2][0] != CONTROLS:
        return []
    types = []
    for tag, c_start, c_end in _children(data, parts[2][1], parts[2][2]):
        inner = _children(data, c_start, c_end) if tag == SEQUENCE else []
        if not inner or inner[0][0] != OCTET_STRING:
            raise BERError("a malformed control")
        types.append(data[inner[0][1] : inner[0][2]].decode("ascii", "replace"))
    return types


def attribute_type(description: bytes) -> bytes:
    """An attribute description's type, comparable: lower case, without
    options or an ``OID.`` prefix."""
    name = description.split(b";", 1)[0].strip().lower()
    return name[4:] if name.startswith(b"oid.") else name


def compared_attribute(message: Message) -> bytes:
    """A CompareRequest's attribute type, in lower case without options."""
    data = message.frame
    parts = _children(data, message.op_start, message.op_end)
    if len(parts) != 2 or parts[1][0] != SEQUENCE:
        raise BERError("a malformed compare request")
    ava = _children(data, parts[1][1], parts[1][2])
    if not ava or ava[0][0] != OCTET_STRING:
        raise BERError("a malformed compare request")
    return attribute_type(data[ava[0][1] : ava[0][2]])


def entry_name(message: Message) -> bytes:
    """The objectName of a SearchResultEntry."""
    parts = _children(message.frame, message.op_start, message.op_end)
    if not parts or parts[0][0] != OCTET_STRING:
        raise BERError("a search result entry without a name")
    return message.frame[parts[0][1] : parts[0][2]]


def without_attributes(message: Message, names: frozenset[bytes]) -> bytes | None:
    """A SearchResultEntry's frame without the attributes whose type (in
    lower case, options ignored) is in ``names``; None if it has none."""
    data = message.frame
    parts = _children(data, message.op_start, message.op_end)
    if len(parts) != 2 or parts[0][0] != OCTET_STRING or parts[1][0] != SEQUENCE:
        raise BERError("a malformed search result entry")
    kept = []
    for tag, start, end in _children(data, parts[1][1], parts[1][2]):
        inner = _children(data, start, end)
        if tag != SEQUENCE or not inner or inner[0][0] != OCTET_STRING:
            raise BERError("a malformed attribute")
        if attribute_type(data[inner[0][1] : inner[0][2]]) not in names:
            kept.append(tlv(SEQUENCE, data[start:end]))
    if len(kept) == len(_children(data, parts[1][1], parts[1][2])):
        return None
    entry = tlv(message.op_tag, tlv(OCTET_STRING, data[parts[0][1] : parts[0][2]])
                + tlv(SEQUENCE, b"".join(kept)))
    _, start, end = _element(data, 0, len(data))
    outer = _children(data, start, end)
    rest = b"".join(tlv(tag, data[a:b]) for tag, a, b in outer[2:])  # controls
    return tlv(SEQUENCE, tlv(INTEGER, data[outer[0][1] : outer[0][2]]) + entry + rest)


# A SearchRequest's filter (RFC 4511 4.5.1.7), by tag: the choices that
# hold other filters, and those that name an attribute first.
_FILTER_SETS = frozenset({0xA0, 0xA1})  # and, or
_FILTER_NOT = 0xA2
_FILTER_NAMED = frozenset({0xA3, 0xA4, 0xA5, 0xA6, 0xA8})  # =, substrings, >=, <=, ~=
_FILTER_PRESENT = 0x87
_FILTER_EXTENSIBLE = 0xA9
# Its attribute list: "no attributes" (RFC 4511 4.5.1.8).
NO_ATTRIBUTES = b"1.1"


def _search_parts(message: Message) -> list[tuple[int, int, int]]:
    parts = _children(message.frame, message.op_start, message.op_end)
    if message.op_tag != SEARCH_REQUEST or len(parts) != 8 or parts[7][0] != SEQUENCE:
        raise BERError("a malformed search request")
    return parts


def searched_attributes(message: Message) -> tuple[list[bytes], set[bytes]]:
    """A SearchRequest's attribute list, as sent, and the attribute types
    its filter names (comparable: see :func:`attribute_type`); an
    extensible match of any attribute names ``b"*"``."""
    data = message.frame
    parts = _search_parts(message)
    requested = []
    for tag, start, end in _children(data, parts[7][1], parts[7][2]):
        if tag != OCTET_STRING:
            raise BERError("a malformed attribute list")
        requested.append(data[start:end])
    named: set[bytes] = set()
    pending = [parts[6]]
    while pending:  # the depth is bounded by the framer's check
        tag, start, end = pending.pop()
        if tag in _FILTER_SETS:
            pending += _children(data, start, end)
        elif tag == _FILTER_NOT:
            pending.append(_element(data, start, end))
        elif tag in _FILTER_NAMED:
            inner = _children(data, start, end)
            if not inner or inner[0][0] != OCTET_STRING:
                raise BERError("a malformed filter")
            named.add(attribute_type(data[inner[0][1] : inner[0][2]]))
        elif tag == _FILTER_PRESENT:
            named.add(attribute_type(data[start:end]))
        elif tag == _FILTER_EXTENSIBLE:
            types = [data[a:b] for t, a, b in _children(data, start, end) if t == 0x82]
            named.add(attribute_type(types[0]) if types else b"*")
        else:
            raise BERError("an unknown filter")
    return requested, named


def with_requested_attributes(message: Message, attributes: list[bytes]) -> bytes:
    """A SearchRequest's frame asking for ``attributes`` instead (its
    controls kept)."""
    data = message.frame
    parts = _search_parts(message)
    head = data[message.op_start : parts[6][2]]  # up to the attribute list
    op = tlv(message.op_tag, head + tlv(SEQUENCE, b"".join(tlv(OCTET_STRING, a)
                                                          for a in attributes)))
    return _with_op(message, op)


def _with_op(message: Message, op: bytes) -> bytes:
    """The message's frame with another operation (its id and controls kept)."""
    data = message.frame
    _, start, end = _element(data, 0, len(data))
    outer = _children(data, start, end)
    rest = b"".join(tlv(tag, data[a:b]) for tag, a, b in outer[2:])
    return tlv(SEQUENCE, tlv(INTEGER, data[outer[0][1] : outer[0][2]]) + op + rest)


def with_result(message: Message, code: int, text: str) -> bytes:
    """An LDAPResult-shaped response's frame with another code and text,
    its matched DN kept, without a referral (or anything after it)."""
    data = message.frame
    parts = _children(data, message.op_start, message.op_end)
    if len(parts) < 3 or parts[0][0] != ENUMERATED or parts[1][0] != OCTET_STRING:
        raise BERError("a malformed result")
    body = (_int(ENUMERATED, code) + tlv(OCTET_STRING, data[parts[1][1] : parts[1][2]])
            + tlv(OCTET_STRING, text.encode()))
    return _with_op(message, tlv(message.op_tag, body))


def parse_result_code(message: Message) -> int:
    """The resultCode of an LDAPResult-shaped response."""
    parts = _children(message.frame, message.op_start, message.op_end)
    if not parts or parts[0][0] != ENUMERATED:
        raise BERError("a response without a result code")
    return _integer(message.frame[parts[0][1] : parts[0][2]])


# -- writing -----------------------------------------------------------------------


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _length(len(value)) + value


def _int(tag: int, n: int) -> bytes:
    return tlv(tag, n.to_bytes(max(1, (n.bit_length() + 8) // 8), "big", signed=True))


def message(id: int, op: bytes) -> bytes:
    return tlv(SEQUENCE, _int(INTEGER, id) + op)


def result(
    id: int, tag: int, code: int, text: str = "", matched: str = "", extra: bytes = b""
) -> bytes:
    """An LDAPResult-shaped response: bind, search done, modify, ..., extended."""
    if not (text or matched or extra):
        # The same few answers again and again (a bind's success, above
        # all): encoded once each; only the message id differs.
        return message(id, _bare_result_op(tag, code))
    return message(id, _result_op(tag, code, text, matched, extra))


@functools.lru_cache(maxsize=64)
def _bare_result_op(tag: int, code: int) -> bytes:
    return _result_op(tag, code, "", "", b"")


def _result_op(tag: int, code: int, text: str, matched: str, extra: bytes) -> bytes:
    body = (
        _int(ENUMERATED, code)
        + tlv(OCTET_STRING, matched.encode())
        + tlv(OCTET_STRING, text.encode())
        + extra
    )
    return tlv(tag, body)


def extended_response(
    id: int, code: int, text: str = "", name: str | None = None, value: bytes | None = None
) -> bytes:
    extra = b""
    if name is not None:
        extra += tlv(0x8A, name.encode())
    if value is not None:
        extra += tlv(0x8B, value)
    return result(id, EXTENDED_RESPONSE, code, text, extra=extra)


def notice_of_disconnection(code: int, text: str) -> bytes:
    """The unsolicited notification (message id 0) sent before closing (RFC 4511 4.4.1)."""
    return extended_response(0, code, text, name=NOTICE_OF_DISCONNECTION)


def with_control(message: Message, oid: str, value: bytes, critical: bool = True) -> bytes:
    """The message's frame with one more control (after any it carries)."""
    data = message.frame
    _, start, end = _element(data, 0, len(data))
    parts = _children(data, start, end)
    control = tlv(SEQUENCE, tlv(OCTET_STRING, oid.encode())
                  + (tlv(BOOLEAN, b"\xff") if critical else b"") + tlv(OCTET_STRING, value))
    head = data[start : parts[1][2]]  # the message id and the operation, as they came
    existing = data[parts[2][1] : parts[2][2]] if len(parts) > 2 and parts[2][0] == CONTROLS else b""
    return tlv(SEQUENCE, head + tlv(CONTROLS, existing + control))


def bind_request(id: int, name: str, password: str) -> bytes:
    secret = password.encode("utf-8", "surrogateescape")
    body = _int(INTEGER, 3) + tlv(OCTET_STRING, name.encode()) + tlv(0x80, secret)
    return message(id, tlv(BIND_REQUEST, body))


def extended_request(id: int, name: str) -> bytes:
    return message(id, tlv(EXTENDED_REQUEST, tlv(0x80, name.encode())))
