"""TDS codec against the MS-TDS section 4 example dumps (whole, byte by byte, random chunks) plus fuzzing."""
import datetime
import decimal
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multiproxy_engines.tds.wire import messages as tp
from multiproxy_engines.tds.wire import token_stream as tk
from multiproxy_engines.tds.wire.token_stream import TypeInfo


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

# MS-TDS 4.3 Login Request with Federated Authentication (Live ID library, fFedAuthEcho set)
FEDAUTH_LOGIN7_REQUEST = h("""10 01 08 10 00 00 01 00 08 08 00 00 04 00 00 74 00 10 00 00 00 00 00 07 40 37 00 00 00 00 00 00 E0 03 00 10 00 00
    00 00 09 04 00 00 5E 00 0F 00 00 00 00 00 00 00 00 00 7C 00 06 00 88 00 18 00 B8 00 04 00 BC 00 04 00 C4 00 00 00
    C4 00 00 00 00 15 5D 71 E7 42 00 00 00 00 C4 00 00 00 00 00 00 00 00 00 00 00 44 00 41 00 4E 00 42 00 45 00 4E 00
    45 00 44 00 33 00 2D 00 58 00 47 00 5A 00 55 00 4F 00 53 00 51 00 4C 00 43 00 4D 00 44 00 63 00 6C 00 6F 00 75 00
    64 00 2E 00 64 00 65 00 76 00 2E 00 6D 00 73 00 63 00 64 00 73 00 2E 00 63 00 6F 00 6D 00 2C 00 31 00 34 00 33 00
    35 00 C4 00 00 00 4F 00 44 00 42 00 43 00 02 3E 07 00 00 01 E2 06 00 00 74 00 3D 00 45 00 77 00 43 00 51 00 41 00
    6A 00 4B 00 6A 00 42 00 77 00 41 00 55 00 53 00 30 00 48 00 6F 00 2F 00 30 00 65 00 31 00 52 00 35 00 4D 00 32 00
    77 00 37 00 74 00 69 00 44 00 72 00 36 00 70 00 4D 00 63 00 75 00 77 00 33 00 35 00 6B 00 41 00 41 00 61 00 62 00
    76 00 45 00 38 00 6F 00 55 00 45 00 71 00 2F 00 50 00 45 00 75 00 4C 00 37 00 32 00 64 00 54 00 74 00 64 00 4D 00
    42 00 43 00 7A 00 46 00 37 00 41 00 64 00 4A 00 6D 00 6E 00 70 00 45 00 68 00 34 00 32 00 65 00 41 00 46 00 57 00
    37 00 2F 00 38 00 49 00 6A 00 41 00 53 00 6D 00 78 00 79 00 50 00 30 00 30 00 71 00 59 00 64 00 76 00 65 00 31 00
    5A 00 6B 00 45 00 2F 00 58 00 6C 00 63 00 4E 00 79 00 69 00 77 00 6F 00 55 00 76 00 54 00 4E 00 4F 00 6B 00 74 00
    42 00 45 00 4C 00 71 00 76 00 37 00 58 00 4A 00 54 00 6F 00 47 00 71 00 56 00 32 00 6F 00 6B 00 51 00 6E 00 2F 00
    65 00 63 00 50 00 41 00 78 00 32 00 71 00 6A 00 55 00 57 00 74 00 6B 00 54 00 59 00 56 00 66 00 62 00 72 00 51 00
    58 00 78 00 76 00 4E 00 58 00 66 00 69 00 72 00 77 00 47 00 57 00 63 00 43 00 45 00 4B 00 79 00 46 00 64 00 76 00
    35 00 62 00 78 00 55 00 75 00 68 00 69 00 49 00 62 00 39 00 42 00 55 00 56 00 54 00 56 00 4B 00 6A 00 57 00 51 00
    34 00 78 00 4E 00 46 00 4E 00 6B 00 43 00 33 00 73 00 58 00 71 00 6F 00 46 00 52 00 31 00 49 00 46 00 64 00 76 00
    6A 00 4C 00 76 00 63 00 71 00 71 00 38 00 70 00 47 00 69 00 54 00 64 00 51 00 2F 00 76 00 37 00 6F 00 44 00 6B 00
    38 00 78 00 5A 00 42 00 6E 00 61 00 73 00 4C 00 36 00 71 00 2F 00 62 00 38 00 36 00 73 00 5A 00 6C 00 2B 00 55 00
    35 00 77 00 69 00 4C 00 50 00 50 00 54 00 68 00 67 00 4D 00 70 00 49 00 46 00 2F 00 42 00 61 00 43 00 2F 00 72 00
    45 00 4F 00 51 00 50 00 6B 00 6B 00 63 00 51 00 4A 00 4F 00 56 00 54 00 71 00 51 00 72 00 64 00 63 00 4B 00 4F 00
    4D 00 56 00 4E 00 4A 00 61 00 55 00 50 00 49 00 52 00 33 00 64 00 2B 00 42 00 62 00 43 00 66 00 31 00 6D 00 5A 00
    62 00 7A 00 6F 00 6E 00 64 00 4F 00 51 00 77 00 39 00 57 00 37 00 49 00 77 00 63 00 6D 00 30 00 45 00 44 00 69 00
    78 00 51 00 71 00 70 00 41 00 74 00 61 00 75 00 63 00 42 00 48 00 4F 00 33 00 46 00 75 00 37 00 6D 00 49 00 63 00
    69 00 78 00 46 00 39 00 67 00 53 00 2F 00 46 00 4B 00 38 00 2F 00 37 00 6C 00 6E 00 78 00 34 00 53 00 6E 00 33 00
    5A 00 2F 00 51 00 7A 00 2B 00 48 00 76 00 6A 00 4C 00 49 00 57 00 2F 00 76 00 44 00 77 00 7A 00 77 00 44 00 5A 00
    67 00 41 00 41 00 43 00 4E 00 6D 00 73 00 64 00 34 00 65 00 79 00 68 00 4E 00 49 00 75 00 59 00 41 00 47 00 62 00
    58 00 62 00 41 00 4B 00 51 00 37 00 63 00 4A 00 66 00 31 00 6B 00 78 00 31 00 31 00 6D 00 4E 00 42 00 49 00 34 00
    79 00 42 00 44 00 36 00 4E 00 4E 00 54 00 53 00 6F 00 63 00 75 00 46 00 42 00 6A 00 4F 00 6B 00 2B 00 73 00 41 00
    5A 00 4C 00 35 00 5A 00 34 00 56 00 4E 00 32 00 4D 00 4C 00 71 00 49 00 35 00 71 00 38 00 58 00 54 00 58 00 35 00
    72 00 58 00 57 00 65 00 79 00 4B 00 75 00 62 00 76 00 49 00 2F 00 59 00 2F 00 6D 00 64 00 42 00 6A 00 64 00 4E 00
    36 00 37 00 51 00 57 00 49 00 72 00 75 00 65 00 73 00 4B 00 52 00 56 00 65 00 32 00 35 00 31 00 31 00 54 00 6E 00
    42 00 58 00 46 00 62 00 70 00 53 00 47 00 6E 00 42 00 4A 00 65 00 38 00 6F 00 31 00 4B 00 69 00 50 00 55 00 70 00
    55 00 4B 00 6A 00 48 00 74 00 54 00 6D 00 75 00 34 00 36 00 4F 00 43 00 4F 00 38 00 4A 00 49 00 62 00 48 00 47 00
    6C 00 70 00 4F 00 70 00 62 00 70 00 6E 00 50 00 49 00 73 00 79 00 36 00 39 00 49 00 58 00 6B 00 45 00 7A 00 67 00
    38 00 64 00 36 00 34 00 43 00 74 00 65 00 54 00 2F 00 61 00 63 00 73 00 35 00 68 00 4F 00 72 00 62 00 32 00 44 00
    73 00 44 00 6F 00 6E 00 4A 00 71 00 65 00 6D 00 46 00 58 00 54 00 47 00 6D 00 35 00 30 00 37 00 30 00 65 00 71 00
    35 00 74 00 75 00 6A 00 69 00 5A 00 75 00 43 00 52 00 30 00 4C 00 54 00 36 00 62 00 59 00 49 00 76 00 59 00 64 00
    76 00 42 00 6D 00 70 00 52 00 6C 00 31 00 33 00 38 00 41 00 53 00 42 00 32 00 58 00 48 00 30 00 36 00 43 00 4B 00
    39 00 33 00 55 00 38 00 63 00 4F 00 54 00 38 00 68 00 68 00 6E 00 6A 00 32 00 53 00 4D 00 49 00 61 00 2B 00 4B 00
    30 00 37 00 62 00 72 00 6F 00 66 00 43 00 50 00 4B 00 35 00 37 00 51 00 66 00 43 00 4D 00 35 00 32 00 4F 00 49 00
    4B 00 33 00 2F 00 30 00 67 00 70 00 6F 00 4C 00 41 00 6C 00 4A 00 6E 00 49 00 56 00 59 00 72 00 45 00 6B 00 6B 00
    41 00 6E 00 47 00 59 00 79 00 70 00 52 00 34 00 45 00 34 00 6F 00 4D 00 4D 00 33 00 63 00 48 00 32 00 38 00 4D 00
    42 00 4C 00 66 00 30 00 76 00 47 00 57 00 2F 00 4D 00 62 00 6E 00 74 00 61 00 31 00 35 00 47 00 37 00 47 00 72 00
    71 00 76 00 54 00 41 00 73 00 5A 00 30 00 78 00 42 00 6C 00 35 00 76 00 38 00 74 00 44 00 31 00 4F 00 70 00 70 00
    6B 00 47 00 6D 00 2B 00 78 00 56 00 62 00 54 00 78 00 49 00 6E 00 2F 00 31 00 7A 00 51 00 67 00 67 00 32 00 71 00
    54 00 4F 00 45 00 53 00 6D 00 6E 00 63 00 49 00 4B 00 38 00 49 00 44 00 6A 00 46 00 50 00 7A 00 79 00 59 00 31 00
    71 00 38 00 45 00 49 00 6A 00 38 00 39 00 52 00 72 00 2B 00 63 00 6C 00 51 00 4C 00 33 00 62 00 76 00 39 00 69 00
    38 00 4F 00 34 00 68 00 77 00 66 00 43 00 62 00 5A 00 51 00 65 00 63 00 38 00 59 00 4F 00 31 00 4D 00 67 00 4F 00
    5A 00 32 00 63 00 2B 00 5A 00 74 00 39 00 45 00 55 00 54 00 67 00 31 00 78 00 51 00 49 00 31 00 6A 00 49 00 71 00
    76 00 2B 00 65 00 47 00 63 00 62 00 47 00 50 00 66 00 47 00 78 00 4C 00 4C 00 45 00 57 00 76 00 66 00 2B 00 6A 00
    54 00 71 00 58 00 63 00 6B 00 55 00 68 00 79 00 4A 00 42 00 47 00 33 00 6D 00 41 00 45 00 3D 00 26 00 70 00 3D 00
    DF 31 12 79 58 7C 0F CD 2B ED 31 0D 8A 06 71 A7 C4 A6 DE BB 08 4F 37 12 07 E2 E9 09 C7 B0 2A 1D 74 6C 73 2D 75 6E
    69 71 75 65 3A 20 87 E9 38 E3 2C 32 4F 6C F9 8E 5B 0D 40 B2 1B 57 0E AB FE EF 2F CD 58 DA 0F 7F BD 9C D0 8B F2 15
    85 F3 83 20 7C 22 F8 17 9A 95 8F FF""")
# MS-TDS 4.5 Login Response with Federated Authentication Feature Extension Acknowledgement
FEDAUTH_LOGIN_RESPONSE = h("""04 01 01 BC 01 4A 01 00 E3 1B 00 01 06 6D 00 61 00 73 00 74 00 65 00 72 00 06 6D 00 61 00 73 00 74 00 65 00 72 00
    AB 62 00 45 16 00 00 02 00 25 00 43 00 68 00 61 00 6E 00 67 00 65 00 64 00 20 00 64 00 61 00 74 00 61 00 62 00 61
    00 73 00 65 00 20 00 63 00 6F 00 6E 00 74 00 65 00 78 00 74 00 20 00 74 00 6F 00 20 00 27 00 6D 00 61 00 73 00 74
    00 65 00 72 00 27 00 2E 00 05 63 00 6C 00 6F 00 75 00 64 00 00 01 00 00 00 E3 08 00 07 05 09 04 D0 00 34 00 E3 17
    00 02 0A 75 00 73 00 5F 00 65 00 6E 00 67 00 6C 00 69 00 73 00 68 00 00 AB 66 00 47 16 00 00 01 00 27 00 43 00 68
    00 61 00 6E 00 67 00 65 00 64 00 20 00 6C 00 61 00 6E 00 67 00 75 00 61 00 67 00 65 00 20 00 73 00 65 00 74 00 74
    00 69 00 6E 00 67 00 20 00 74 00 6F 00 20 00 75 00 73 00 5F 00 65 00 6E 00 67 00 6C 00 69 00 73 00 68 00 2E 00 05
    63 00 6C 00 6F 00 75 00 64 00 00 01 00 00 00 AD 36 00 01 74 00 00 04 16 4D 00 69 00 63 00 72 00 6F 00 73 00 6F 00
    66 00 74 00 20 00 53 00 51 00 4C 00 20 00 53 00 65 00 72 00 76 00 65 00 72 00 00 00 00 00 0B 00 08 CB E3 13 00 04
    04 34 00 30 00 39 00 36 00 04 34 00 30 00 39 00 36 00 AE 02 40 00 00 00 C9 08 46 4E 58 49 0C 71 80 72 CD 69 F0 EC
    3D E2 F6 ED 75 8C 77 7D 9C B8 BB 87 4A 9C 90 80 A4 EE 40 B6 07 71 0E A8 3C 0E D7 DE 14 DE F3 8B 65 C2 06 8C F9 51
    D3 BC 32 55 15 A5 E4 A2 45 62 78 80 FF FD 00 00 00 00 00 00 00 00 00 00 00 00""")

VECTORS = [PRELOGIN_REQUEST, LOGIN7_REQUEST, LOGIN_RESPONSE, SQL_BATCH_REQUEST, SQL_BATCH_RESPONSE, RPC_REQUEST,
           RPC_RESPONSE, ATTENTION_REQUEST, TM_REQUEST, FEDAUTH_LOGIN7_REQUEST, FEDAUTH_LOGIN_RESPONSE]


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


# LOGIN7 of FreeTDS tsql with TDSVER=7.1 (user jtds, password pw): TDS 7.1's fixed part is 86 bytes, without 7.2's
# ibChangePassword, cchChangePassword and cbSSPILong, so the variable data starts at offset 86.
LOGIN7_TDS71 = bytes.fromhex(
    "aa00000001000071001000000683f2f81d2c000000000000e003000088ffffff36040000560002005a00040062000200660004006e00"
    "09000000000080000b0096000a00aa00000002fc00000001aa000000aa00000076006d006a00740064007300a2a5d2a5540053005100"
    "4c003100320037002e0030002e0030002e0031005400440053002d004c00690062007200610072007900750073005f0065006e006700"
    "6c00690073006800")


def test_login7_of_tds71_decodes_with_its_shorter_fixed_part():
    login = tp.Login7.decode(LOGIN7_TDS71)
    assert login.tds_version == tp.TDS71 < tp.TDS72
    assert (login.username, login.password, login.appname) == ("jtds", "pw", "TSQL")
    assert (login.library, login.language, login.database) == ("TDS-Library", "us_english", "")
    assert (login.sspi, login.attach_db_file, login.change_password, login.features) == (b"", "", "", {})
    with pytest.raises(tp.ProtocolError):             # its fixed part cut short
        tp.Login7.decode(LOGIN7_TDS71[:80])
    data = bytearray(LOGIN7_TDS71)
    data[36:38] = (80).to_bytes(2, "little")           # ibHostName inside the 86-byte fixed part
    with pytest.raises(tp.ProtocolError):
        tp.Login7.decode(bytes(data))


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


# FEDAUTH FeatureData with the security-token library as python-tds and SqlClient send an access token: Options 0x03
# (library 0x01 << 1, fFedAuthEcho), the token's byte length, the token in UTF-16LE ("eyJ0"), no nonce.
SECURITY_TOKEN_FEATURE = h("03 08 00 00 00 65 00 79 00 4A 00 30 00")
# A whole LOGIN7 carrying it: no user name or password, fExtension set, FeatureExt behind the variable data.
SECURITY_TOKEN_LOGIN7 = tp.Login7(database="app", fedauth=tp.FedAuth.security_token("eyJ0")).encode()


def test_fedauth_login7_from_the_spec_decodes():
    """MS-TDS 4.3: Live ID library with fFedAuthEcho, an opaque token, then nonce, channel binding and signature."""
    login = tp.Login7.decode(tp.MessageReader().feed(FEDAUTH_LOGIN7_REQUEST)[0].data)
    assert (login.hostname, login.appname, login.servername, login.library) == (
        "DANBENED3-XGZUO", "SQLCMD", "cloud.dev.mscds.com,1435", "ODBC")
    assert (login.username, login.password) == ("", "")
    assert login.option_flags3 & tp.F_EXTENSION and list(login.features) == [tp.FEATURE_FEDAUTH]
    fed = login.fedauth
    assert (fed.library, fed.echo) == (tp.FEDAUTH_LIVEID, True)
    assert len(fed.token) == 0x06E2 and fed.text.startswith("t=EwCQAjKjBwAUS0Ho/0e1R5M2w7tiDr6pMcuw35kAAabv")
    assert fed.text.endswith("=&p=")
    assert fed.nonce == h("DF 31 12 79 58 7C 0F CD 2B ED 31 0D 8A 06 71 A7 C4 A6 DE BB 08 4F 37 12 07 E2 E9 09 C7 B0 "
                          "2A 1D")
    assert fed.signed_data[:23] == b"tls-unique: " + h("87 E9 38 E3 2C 32 4F 6C F9 8E 5B")   # channel binding
    assert fed.signed_data[23:] == h("0D 40 B2 1B 57 0E AB FE EF 2F CD 58 DA 0F 7F BD 9C D0 8B F2 15 85 F3 83 20 7C "
                                     "22 F8 17 9A 95 8F")
    assert fed.encode() == login.features[tp.FEATURE_FEDAUTH]          # and back, byte for byte
    again = tp.Login7.decode(login.encode())
    assert (again.hostname, again.fedauth) == (login.hostname, fed)


def test_fedauth_security_token_feature():
    fed = tp.FedAuth.decode(SECURITY_TOKEN_FEATURE)
    assert (fed.library, fed.echo, fed.text, fed.nonce) == (tp.FEDAUTH_SECURITYTOKEN, True, "eyJ0", None)
    assert tp.FedAuth.security_token("eyJ0").encode() == SECURITY_TOKEN_FEATURE
    assert tp.FedAuth.decode(h("02 08 00 00 00 65 00 79 00 4A 00 30 00")).echo is False
    nonce = bytes(range(32))
    fed = tp.FedAuth.decode(SECURITY_TOKEN_FEATURE + nonce)
    assert fed.nonce == nonce and fed.text == "eyJ0"
    assert tp.FedAuth.decode(h("05 01")).workflow == 1                 # ADAL: the workflow only
    login = tp.Login7.decode(SECURITY_TOKEN_LOGIN7)
    assert login.username == "" and login.database == "app"
    assert login.features == {tp.FEATURE_FEDAUTH: SECURITY_TOKEN_FEATURE}
    assert login.fedauth == tp.FedAuth(tp.FEDAUTH_SECURITYTOKEN, True, "eyJ0".encode("utf-16-le"))
    long_token = "x" * 2000                                            # far past the 128-character password limit
    assert tp.Login7.decode(tp.Login7(fedauth=tp.FedAuth.security_token(long_token)).encode()).fedauth.text \
        == long_token


@pytest.mark.parametrize("data,problem", [
    (b"", "without its Options byte"),
    (h("03 08 00 00"), "too short"),
    (h("03 00 00 00 00"), "token is empty"),
    (h("03 0A 00 00 00 65 00 79 00 4A 00 30 00"), "runs past"),
    (h("03 FF FF FF FF 65 00"), "runs past"),
    (h("03 07 00 00 00 65 00 79 00 4A 00 30"), "odd length"),
    (SECURITY_TOKEN_FEATURE + b"\0" * 31, "only a 32-byte nonce"),
    (SECURITY_TOKEN_FEATURE + b"\0" * 33, "only a 32-byte nonce"),
    (h("01 02 00 00 00 AB CD") + b"\0" * 63, "lacks its nonce and signature"),
    (h("04"), "ADAL data is 0 bytes"),
    (h("04 01 02"), "ADAL data is 2 bytes"),
    (h("7E 02 00 00 00 65 00"), "reserved"),
    (h("FE 02 00 00 00 65 00"), "reserved"),
])
def test_bad_fedauth_feature_data_is_a_protocol_error(data, problem):
    with pytest.raises(tp.ProtocolError, match=problem):
        tp.FedAuth.decode(data)


def test_bad_featureext_in_login7_is_a_protocol_error():
    good = bytearray(SECURITY_TOKEN_LOGIN7)
    ext_at = struct.unpack_from("<H", good, 36 + 4 * 5)[0]            # ibExtension: where the DWORD offset is
    feature_at = struct.unpack_from("<I", good, ext_at)[0]
    assert good[feature_at] == tp.FEATURE_FEDAUTH and good[-1] == tp.FEATURE_TERMINATOR

    def patched(pos, fmt, value, cut=None):
        data = bytearray(good)
        struct.pack_into(fmt, data, pos, value)
        return bytes(data[:cut])

    cases = [
        (patched(ext_at, "<I", 10), "FeatureExt offset lies outside"),            # inside the fixed part
        (patched(ext_at, "<I", len(good)), "FeatureExt offset lies outside"),     # past the end
        (patched(ext_at, "<I", 0xFFFFFFFF), "FeatureExt offset lies outside"),
        (patched(36 + 4 * 5, "<H", 0xFFF0), "extension .* lies outside"),         # ibExtension itself
        (patched(feature_at + 1, "<I", 0x7FFFFFFF), "FeatureExt data lies outside"),
        (patched(feature_at + 1, "<I", len(SECURITY_TOKEN_FEATURE) + 1), "FeatureExt"),   # eats the terminator
        (patched(feature_at + 6, "<I", 0x1000), "runs past"),                    # the token length inside
        (patched(0, "<I", len(good) - 1, len(good) - 1), "no terminator"),        # terminator cut off
        (patched(0, "<I", feature_at + 3, feature_at + 3), "truncated LOGIN7 FeatureExt"),
    ]
    twice = tp.Login7(fedauth=tp.FedAuth.security_token("a"), features={tp.FEATURE_FEDAUTH: b"x"}).encode()
    assert tp.Login7.decode(twice).fedauth.text == "a"                 # fedauth wins over raw feature data
    dup = bytearray(tp.Login7(features={7: b"", 9: b""}).encode())
    dup[dup.rindex(9, 0, len(dup) - 1)] = 7                            # the second feature id becomes the first's
    cases.append((bytes(dup), "names feature 0x07 twice"))
    for data, problem in cases:
        with pytest.raises(tp.ProtocolError, match=problem):
            tp.Login7.decode(data)


def test_prelogin_fedauthrequired_and_nonce():
    nonce = bytes(range(32))
    pre = tp.Prelogin.decode(tp.Prelogin.build(encryption=tp.ENCRYPT_ON, fedauth_required=1, nonce=nonce).encode())
    assert (pre.fedauth_required, pre.nonce, pre.encryption) == (1, nonce, tp.ENCRYPT_ON)
    # python-tds's PRELOGIN with an access token: VERSION, ENCRYPTION, INSTOPT, THREADID, MARS, FEDAUTHREQUIRED = 1
    pytds_style = h("00 00 1F 00 06 01 00 25 00 01 02 00 26 00 0C 03 00 32 00 04 04 00 36 00 01 06 00 37 00 01 FF"
                    "01 11 00 00 00 00 00 4D 53 53 51 4C 53 65 72 76 65 72 00 00 00 00 00 00 01")
    pre = tp.Prelogin.decode(pytds_style)
    assert (pre.fedauth_required, pre.nonce, pre.instance) == (1, None, "MSSQLServer")
    plain = tp.Prelogin.decode(PRELOGIN_REQUEST[8:])
    assert (plain.fedauth_required, plain.nonce) == (None, None)
    odd = tp.Prelogin({tp.PL_NONCEOPT: b"short", tp.PL_FEDAUTHREQUIRED: b""})
    assert (odd.nonce, odd.fedauth_required) == (None, None)


def test_featureextack_for_fedauth():
    """The builder reproduces the FEATUREEXTACK of MS-TDS 4.5 byte for byte (Live ID: nonce and signature); a
    security-token login is acknowledged with no data, or with the client's PRELOGIN nonce when it sent one."""
    message = tp.MessageReader().feed(FEDAUTH_LOGIN_RESPONSE)[0]
    toks = tk.TokenReader().read(message.data)
    assert [t.type for t in toks][-2:] == [tk.TOKEN_FEATUREEXTACK, tk.TOKEN_DONE]
    ack_data = toks[-2].features[tp.FEATURE_FEDAUTH]
    built = tk.featureextack({tp.FEATURE_FEDAUTH: ack_data})
    assert built == h("AE 02 40 00 00 00") + ack_data + h("FF")
    assert built in message.data and message.data.endswith(built + tk.done())
    assert tk.fedauth_ack() == h("AE 02 00 00 00 00 FF")
    nonce = bytes(range(32))
    assert tk.fedauth_ack(nonce) == h("AE 02 20 00 00 00") + nonce + h("FF")
    (tok,) = tk.TokenReader().read(tk.fedauth_ack())
    assert tok.features == {tp.FEATURE_FEDAUTH: b""}


DECODERS = [tp.Prelogin.decode, tp.Login7.decode, tp.SqlBatch.decode, tp.RpcRequest.decode,
            tp.TransactionRequest.decode, lambda d: tk.TokenReader().read(d), lambda d: tp.MessageReader().feed(d),
            tp.FedAuth.decode]


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
                                           (tp.Prelogin.decode, PRELOGIN_REQUEST),
                                           (tp.Login7.decode, FEDAUTH_LOGIN7_REQUEST),
                                           (tp.Login7.decode, b"\0" * 8 + SECURITY_TOKEN_LOGIN7),
                                           (tp.Login7.decode, b"\0" * 8 + LOGIN7_TDS71),
                                           (tp.FedAuth.decode, b"\0" * 8 + SECURITY_TOKEN_FEATURE),
                                           (lambda d: tk.TokenReader().read(d), FEDAUTH_LOGIN_RESPONSE)])
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
