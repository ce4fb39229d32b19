"""TDS codec against the MS-TDS section 4 example dumps (whole, byte by byte, random chunks) plus fuzzing."""
import datetime
import decimal
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multiproxy.tds import protocol as tp
from multiproxy.tds import tokens as tk
from multiproxy.tds.tokens import TypeInfo


def h(text: str) -> bytes:
    return bytes.fromhex(" ".join(text.split()))


# MS-TDS 4.1 Pre-Login Request
PRELOGIN_REQUEST = h("""12 01 00 2F 00 00 01 00 00 00 1A 00 06 01 00 20 00 01 02 00 21 00 01 03 00 22 00 04 04 00 26 00
    01 FF 09 00 00 00 00 00 01 00 B8 0D 00 00 01""")
# MS-TDS 4.2 Login Request
LOGIN7_REQUEST = h("""10 01 00 90 00 00 01 00 88 00 00 00 02 00 09 72 00 10 00 00 00 00 00 07 00 01 00 00 00 00 00 00
    E0 03 00 00 00 00 00 00 09 04 00 00 5E 00 08 00 6E 00 02 00 72 00 00 00 72 00 07 00 80 00 00 00
    80 00 00 00 80 00 04 00 88 00 00 00 88 00 00 00 00 50 8B E2 B7 8F 88 00 00 00 88 00 00 00 88 00
    00 00 00 00 00 00 73 00 6B 00 6F 00 73 00 74 00 6F 00 76 00 31 00 73 00 61 00 4F 00 53 00 51 00
    4C 00 2D 00 33 00 32 00 4F 00 44 00 42 00 43 00""")
# MS-TDS 4.4 Login Response
LOGIN_RESPONSE = h("""04 01 01 61 00 00 01 00 E3 1B 00 01 06 6D 00 61 00 73 00 74 00 65 00 72 00 06 6D 00 61 00 73 00
    74 00 65 00 72 00 AB 58 00 45 16 00 00 02 00 25 00 43 00 68 00 61 00 6E 00 67 00 65 00 64 00 20
    00 64 00 61 00 74 00 61 00 62 00 61 00 73 00 65 00 20 00 63 00 6F 00 6E 00 74 00 65 00 78 00 74
    00 20 00 74 00 6F 00 20 00 27 00 6D 00 61 00 73 00 74 00 65 00 72 00 27 00 2E 00 00 00 00 00 00
    00 E3 08 00 07 05 09 04 D0 00 34 00 E3 17 00 02 0A 75 00 73 00 5F 00 65 00 6E 00 67 00 6C 00 69
    00 73 00 68 00 00 E3 13 00 04 04 34 00 30 00 39 00 36 00 04 34 00 30 00 39 00 36 00 AB 5C 00 47
    16 00 00 01 00 27 00 43 00 68 00 61 00 6E 00 67 00 65 00 64 00 20 00 6C 00 61 00 6E 00 67 00 75
    00 61 00 67 00 65 00 20 00 73 00 65 00 74 00 74 00 69 00 6E 00 67 00 20 00 74 00 6F 00 20 00 75
    00 73 00 5F 00 65 00 6E 00 67 00 6C 00 69 00 73 00 68 00 2E 00 00 00 00 00 00 00 AD 36 00 01 72
    09 00 02 16 4D 00 69 00 63 00 72 00 6F 00 73 00 6F 00 66 00 74 00 20 00 53 00 51 00 4C 00 20 00
    53 00 65 00 72 00 76 00 65 00 72 00 00 00 00 00 00 00 00 00 FD 00 00 00 00 00 00 00 00 00 00 00
    00""")
# MS-TDS 4.6 SQL Batch Client Request
SQL_BATCH_REQUEST = h("""01 01 00 5C 00 00 01 00 16 00 00 00 12 00 00 00 02 00 00 00 00 00 00 00 00 01 00 00 00 00 0A 00
    73 00 65 00 6C 00 65 00 63 00 74 00 20 00 27 00 66 00 6F 00 6F 00 27 00 20 00 61 00 73 00 20 00
    27 00 62 00 61 00 72 00 27 00 0A 00 20 00 20 00 20 00 20 00 20 00 20 00 20 00 20 00""")
# MS-TDS 4.7 SQL Batch Server Response
SQL_BATCH_RESPONSE = h("""04 01 00 33 00 00 01 00 81 01 00 00 00 00 00 20 00 A7 03 00 09 04 D0 00 34 03 62 00 61 00 72 00
    D1 03 00 66 6F 6F FD 10 00 C1 00 01 00 00 00 00 00 00 00""")
# MS-TDS 4.8 RPC Client Request
RPC_REQUEST = h("""03 01 00 2F 00 00 01 00 16 00 00 00 12 00 00 00 02 00 00 00 00 00 00 00 00 01 00 00 00 00 04 00
    66 00 6F 00 6F 00 33 00 00 00 00 02 26 02 00""")
# MS-TDS 4.9 RPC Server Response
RPC_RESPONSE = h("""04 01 00 27 00 00 01 00 FF 11 00 C1 00 01 00 00 00 00 00 00 00 79 00 00 00 00 FE 00 00 E0 00 00
    00 00 00 00 00 00 00""")
# MS-TDS 4.10 Attention Request
ATTENTION_REQUEST = h("06 01 00 08 00 00 01 00")
# MS-TDS 4.13 Transaction Manager Request (TM_PROMOTE_XACT)
TM_REQUEST = h("0E 01 00 20 00 00 01 00 16 00 00 00 12 00 00 00 02 00 00 00 00 00 00 00 00 01 00 00 00 00 16 00")

VECTORS = [PRELOGIN_REQUEST, LOGIN7_REQUEST, LOGIN_RESPONSE, SQL_BATCH_REQUEST, SQL_BATCH_RESPONSE, RPC_REQUEST,
           RPC_RESPONSE, ATTENTION_REQUEST, TM_REQUEST]


def feed_whole(data):
    return tp.MessageReader().feed(data)


def feed_bytewise(data):
    reader, out = tp.MessageReader(), []
    for i in range(len(data)):
        out += reader.feed(data[i:i + 1])
    return out


def feed_chunks(data, seed=0):
    rng, reader, out, i = random.Random(seed), tp.MessageReader(), [], 0
    while i < len(data):
        n = rng.randint(1, 17)
        out += reader.feed(data[i:i + n])
        i += n
    return out


FEEDERS = [feed_whole, feed_bytewise, feed_chunks, lambda d: feed_chunks(d, 7)]


@pytest.mark.parametrize("feed", FEEDERS)
@pytest.mark.parametrize("vector", VECTORS)
def test_every_vector_reassembles_into_one_message(vector, feed):
    messages = feed(vector)
    assert len(messages) == 1
    assert messages[0].type == vector[0] and messages[0].data == vector[8:]


@pytest.mark.parametrize("feed", FEEDERS)
def test_prelogin_request(feed):
    pre = tp.Prelogin.decode(feed(PRELOGIN_REQUEST)[0].data)
    assert pre.version == (9, 0, 0, 0)
    assert pre.encryption == tp.ENCRYPT_ON
    assert pre.instance == ""
    assert pre.thread_id == 0xB80D0000
    assert pre.mars == 1
    assert pre.encode() == PRELOGIN_REQUEST[8:]


@pytest.mark.parametrize("feed", FEEDERS)
def test_login7_request(feed):
    login = tp.Login7.decode(feed(LOGIN7_REQUEST)[0].data)
    assert (login.tds_version, login.packet_size) == (tp.TDS72, 4096)
    assert (login.hostname, login.username, login.password, login.appname) == ("skostov1", "sa", "", "OSQL-32")
    assert (login.library, login.database, login.language) == ("ODBC", "", "")
    assert login.client_id == h("00 50 8B E2 B7 8F")
    assert not login.integrated_security
    assert tp.Login7.decode(login.encode()) == login


def test_login7_roundtrip_with_password_and_features():
    login = tp.Login7(username="app", password="sëcret!", database="orders", appname="t", features={1: b"xy"})
    again = tp.Login7.decode(login.encode())
    assert (again.username, again.password, again.database, again.features) == ("app", "sëcret!", "orders",
                                                                                 {1: b"xy"})


def test_password_obfuscation_is_nibble_swap_then_xor():
    # 'a' = 0x61 0x00 -> swap 0x16 0x00 -> xor 0xB3 0xA5
    assert tp.obfuscate_password("a") == bytes([0xB3, 0xA5])
    assert tp.deobfuscate_password(bytes([0xB3, 0xA5])) == "a"


def test_login7_offsets_outside_the_message_are_protocol_errors():
    data = bytearray(LOGIN7_REQUEST[8:])
    data[36 + 4:36 + 6] = (0x7000).to_bytes(2, "little")  # ibUserName far away
    with pytest.raises(tp.ProtocolError):
        tp.Login7.decode(bytes(data))
    with pytest.raises(tp.ProtocolError):
        tp.Login7.decode(LOGIN7_REQUEST[8:60])


def test_login_response_tokens_and_builders():
    data = feed_bytewise(LOGIN_RESPONSE)[0].data
    toks = tk.TokenReader().read(data)
    assert [t.type for t in toks] == [tk.TOKEN_ENVCHANGE, tk.TOKEN_INFO, tk.TOKEN_ENVCHANGE, tk.TOKEN_ENVCHANGE,
                                      tk.TOKEN_ENVCHANGE, tk.TOKEN_INFO, tk.TOKEN_LOGINACK, tk.TOKEN_DONE]
    assert (toks[0].env_type, toks[0].new) == (tk.ENV_DATABASE, "master")
    assert toks[1].number == 5701 and toks[5].number == 5703
    assert toks[2].new == tk.DEFAULT_COLLATION
    assert (toks[4].env_type, toks[4].new) == (tk.ENV_PACKETSIZE, "4096")
    assert toks[6].tds_version == h("72 09 00 02")
    built = (tk.envchange(1, "master", "master") + tk.info(5701, "Changed database context to 'master'.", 2)
             + tk.envchange(7, tk.DEFAULT_COLLATION, b"") + tk.envchange(2, "us_english", "")
             + tk.envchange(4, "4096", "4096") + tk.info(5703, "Changed language setting to us_english.", 1)
             + tk.loginack("Microsoft SQL Server\0\0", h("72 09 00 02"), b"\0\0\0\0") + tk.done())
    assert tp.encode_message(tp.TABULAR_RESULT, built) == LOGIN_RESPONSE


def test_sql_batch_request():
    batch = tp.SqlBatch.decode(feed_chunks(SQL_BATCH_REQUEST)[0].data)
    assert batch.text == "\nselect 'foo' as 'bar'\n        "
    # the example's descriptor bytes are 00 .. 00 01 (little-endian), outstanding request count 0
    assert (batch.headers.transaction_descriptor, batch.headers.outstanding_requests) == (1 << 56, 0)
    assert tp.encode_message(tp.SQL_BATCH, tp.SqlBatch(batch.text, batch.headers).encode()) == SQL_BATCH_REQUEST


def test_sql_batch_response_read_and_built():
    toks = tk.TokenReader().read(SQL_BATCH_RESPONSE[8:])
    assert toks[0].columns[0].name == "bar" and toks[0].columns[0].type_info.type == tk.BIGVARCHAR
    assert toks[1].values == ["foo"]
    assert (toks[2].status, toks[2].curcmd, toks[2].rowcount) == (tk.DONE_COUNT, tk.CURCMD_SELECT, 1)
    cols = [tk.Column("bar", TypeInfo(tk.BIGVARCHAR, 3), flags=0x20)]
    built = tk.colmetadata(cols) + tk.row(cols, ["foo"]) + tk.done(tk.DONE_COUNT, tk.CURCMD_SELECT, 1)
    assert tp.encode_message(tp.TABULAR_RESULT, built) == SQL_BATCH_RESPONSE


def test_rpc_request():
    request = tp.RpcRequest.decode(feed_bytewise(RPC_REQUEST)[0].data)
    (call,) = request.calls
    assert call.name == "foo3" and call.option_flags == 0
    (param,) = call.params
    assert param.name == "" and param.status == tp.PARAM_DEFAULT
    assert param.type_info.type == tk.INTN and param.type_info.size == 2 and param.value is None
    assert tp.encode_message(tp.RPC, request.encode()) == RPC_REQUEST


def test_rpc_response_read_and_built():
    toks = tk.TokenReader().read(RPC_RESPONSE[8:])
    assert [t.type for t in toks] == [tk.TOKEN_DONEINPROC, tk.TOKEN_RETURNSTATUS, tk.TOKEN_DONEPROC]
    built = tk.done_in_proc(tk.DONE_COUNT | tk.DONE_MORE, tk.CURCMD_SELECT, 1) + tk.returnstatus(0) + tk.done_proc()
    assert tp.encode_message(tp.TABULAR_RESULT, built) == RPC_RESPONSE


def test_attention_and_transaction_manager_requests():
    assert feed_whole(ATTENTION_REQUEST)[0].type == tp.ATTENTION
    req = tp.TransactionRequest.decode(feed_chunks(TM_REQUEST)[0].data)
    # the example is labelled TM_PROMOTE_XACT but its bytes say 0x0016; keep what the bytes say
    assert req.request_type == 0x16
    assert req.headers.transaction_descriptor == 1 << 56
    assert tp.encode_message(tp.TRANSACTION_MANAGER, req.encode()) == TM_REQUEST


@pytest.mark.parametrize("req", [
    tp.TransactionRequest(tp.TM_BEGIN_XACT, name="t1", isolation_level=2),
    tp.TransactionRequest(tp.TM_COMMIT_XACT, begin_after=True, isolation_level=0, begin_name="n"),
    tp.TransactionRequest(tp.TM_ROLLBACK_XACT, name="sp"),
    tp.TransactionRequest(tp.TM_SAVE_XACT, name="sp"),
])
def test_transaction_requests_roundtrip(req):
    again = tp.TransactionRequest.decode(req.encode())
    assert (again.request_type, again.name, again.begin_after, again.begin_name) == \
        (req.request_type, req.name, req.begin_after, req.begin_name)


def test_split_to_negotiated_packet_size_and_reassemble():
    payload = bytes(range(256)) * 40
    wire = tp.encode_message(tp.SQL_BATCH, payload, 512, status=tp.STATUS_RESETCONNECTION)
    headers = [tp.PacketHeader.decode(wire[i:i + 8]) for i in range(0, len(wire), 512)]
    assert all(hd.length <= 512 for hd in headers)
    assert [hd.packet_id for hd in headers] == list(range(1, len(headers) + 1))
    assert headers[0].status == tp.STATUS_RESETCONNECTION and headers[-1].status == tp.STATUS_EOM
    (msg,) = feed_chunks(wire)
    assert msg.data == payload and msg.reset_connection


def test_bad_packet_lengths_are_protocol_errors():
    with pytest.raises(tp.ProtocolError):
        tp.MessageReader().feed(h("01 01 00 04 00 00 01 00"))
    with pytest.raises(tp.ProtocolError):
        tp.MessageReader(max_packet_size=512).feed(h("01 01 02 01 00 00 01 00"))


def test_ignore_bit_drops_the_message_and_attention_interrupts_one():
    reader = tp.MessageReader()
    assert reader.feed(h("01 00 00 0a 00 00 01 00 41 00") + h("01 03 00 08 00 00 02 00")) == []
    assert reader.feed(h("01 00 00 0a 00 00 01 00 41 00") + ATTENTION_REQUEST)[0].type == tp.ATTENTION


ROUNDTRIP_VALUES = [
    (TypeInfo(tk.INTN, 4), -7), (TypeInfo(tk.INTN, 8), 2 ** 40), (TypeInfo(tk.INTN, 1), 255),
    (TypeInfo(tk.INTN, 2), None), (TypeInfo(tk.INT4), 5), (TypeInfo(tk.BITN, 1), True), (TypeInfo(tk.FLTN, 8), 2.5),
    (TypeInfo(tk.DECIMALN, 17, 38, 2), decimal.Decimal("-12.34")), (TypeInfo(tk.NUMERICN, 5, 9, 0), decimal.Decimal(7)),
    (TypeInfo(tk.NVARCHAR, 4000), "héllo"), (TypeInfo(tk.NCHAR, 10), None), (TypeInfo(tk.BIGVARCHAR, 8000), "abc"),
    (TypeInfo(tk.BIGVARBINARY, 8000), b"\x00\x01"), (TypeInfo(tk.NVARCHAR, tk.PLP_MAX), "x" * 9000),
    (TypeInfo(tk.NVARCHAR, tk.PLP_MAX), None), (TypeInfo(tk.BIGVARBINARY, tk.PLP_MAX), b""),
    (TypeInfo(tk.DATETIMN, 8), datetime.datetime(2024, 2, 29, 13, 14, 15, 120000)),
    (TypeInfo(tk.DATETIME), datetime.datetime(1900, 1, 1)),
    (TypeInfo(tk.DATETIME2N, scale=7), datetime.datetime(2024, 1, 2, 3, 4, 5, 123456)),
    (TypeInfo(tk.DATEN), datetime.date(2001, 9, 9)),
]


@pytest.mark.parametrize("info,value", ROUNDTRIP_VALUES)
def test_values_roundtrip_in_rpc_parameters_and_rows(info, value):
    call = tp.RpcCall(proc_id=tp.SP_EXECUTESQL, params=[tp.RpcParam("@p", info, value)])
    again = tp.RpcRequest.decode(tp.RpcRequest([call]).encode()).calls[0].params[0]
    assert again.value == value and again.type_info.type == info.type
    cols = [tk.Column("c", info)]
    if info.type not in tk.FIXED_SIZES or value is not None:
        toks = tk.TokenReader().read(tk.colmetadata(cols) + tk.row(cols, [value]) + tk.done())
        assert toks[1].values == [value]


def test_transaction_state_from_envchange():
    toks = tk.TokenReader().read(tk.env_begin_tran(9) + tk.done())
    assert tk.transaction_state(toks) == (9, True)
    toks = tk.TokenReader().read(tk.env_commit_tran(9) + tk.env_reset_ack() + tk.done())
    assert tk.transaction_state(toks) == (None, False)


DECODERS = [tp.Prelogin.decode, tp.Login7.decode, tp.SqlBatch.decode, tp.RpcRequest.decode,
            tp.TransactionRequest.decode, lambda d: tk.TokenReader().read(d), lambda d: tp.MessageReader().feed(d)]


@pytest.mark.parametrize("decode", DECODERS)
@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_fuzz_decoders_raise_only_protocol_errors(decode, data):
    try:
        decode(data)
    except tp.ProtocolError:
        pass


@pytest.mark.parametrize("decode,vector", [(tp.Login7.decode, LOGIN7_REQUEST), (tp.RpcRequest.decode, RPC_REQUEST),
                                           (lambda d: tk.TokenReader().read(d), LOGIN_RESPONSE),
                                           (lambda d: tk.TokenReader().read(d), SQL_BATCH_RESPONSE),
                                           (tp.Prelogin.decode, PRELOGIN_REQUEST)])
@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_vectors_raise_only_protocol_errors(decode, vector, data):
    body = bytearray(vector[8:])
    for _ in range(data.draw(st.integers(1, 4))):
        body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(body)))
    try:
        decode(bytes(body[:cut]))
    except tp.ProtocolError:
        pass
