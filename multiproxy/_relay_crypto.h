/* _relay_crypto.h: SHA-256, HMAC-SHA-256 and base64 for the relay's SCRAM-SHA-256 verification (no library needed). */
/*
 * Written from the definitions in FIPS 180-4 (SHA-256), RFC 2104 (HMAC) and RFC 4648 (base64).
 * Self-contained C99; include from exactly one translation unit (everything is static).
 * Words are assembled byte by byte, so there are no unaligned or aliasing accesses.
 * The round constants and initial hash values below were generated with integer arithmetic
 * (first 32 bits of the fractional parts of the cube / square roots of the first primes).
 */
#ifndef MULTIPROXY_RELAY_CRYPTO_H
#define MULTIPROXY_RELAY_CRYPTO_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define RELAY_CRYPTO_UNUSED __attribute__((unused))
#else
#define RELAY_CRYPTO_UNUSED
#endif

typedef struct { uint32_t h[8]; uint64_t total; unsigned char block[64]; size_t used; } Sha256;

/* FIPS 180-4 section 5.3.3: initial hash value H(0). */
static const uint32_t relay_sha256_h0[8] = {
    0x6a09e667u, 0xbb67ae85u, 0x3c6ef372u, 0xa54ff53au, 0x510e527fu, 0x9b05688cu, 0x1f83d9abu, 0x5be0cd19u
};

/* FIPS 180-4 section 4.2.2: round constants K0..K63. */
static const uint32_t relay_sha256_k[64] = {
    0x428a2f98u, 0x71374491u, 0xb5c0fbcfu, 0xe9b5dba5u, 0x3956c25bu, 0x59f111f1u, 0x923f82a4u, 0xab1c5ed5u,
    0xd807aa98u, 0x12835b01u, 0x243185beu, 0x550c7dc3u, 0x72be5d74u, 0x80deb1feu, 0x9bdc06a7u, 0xc19bf174u,
    0xe49b69c1u, 0xefbe4786u, 0x0fc19dc6u, 0x240ca1ccu, 0x2de92c6fu, 0x4a7484aau, 0x5cb0a9dcu, 0x76f988dau,
    0x983e5152u, 0xa831c66du, 0xb00327c8u, 0xbf597fc7u, 0xc6e00bf3u, 0xd5a79147u, 0x06ca6351u, 0x14292967u,
    0x27b70a85u, 0x2e1b2138u, 0x4d2c6dfcu, 0x53380d13u, 0x650a7354u, 0x766a0abbu, 0x81c2c92eu, 0x92722c85u,
    0xa2bfe8a1u, 0xa81a664bu, 0xc24b8b70u, 0xc76c51a3u, 0xd192e819u, 0xd6990624u, 0xf40e3585u, 0x106aa070u,
    0x19a4c116u, 0x1e376c08u, 0x2748774cu, 0x34b0bcb5u, 0x391c0cb3u, 0x4ed8aa4au, 0x5b9cca4fu, 0x682e6ff3u,
    0x748f82eeu, 0x78a5636fu, 0x84c87814u, 0x8cc70208u, 0x90befffau, 0xa4506cebu, 0xbef9a3f7u, 0xc67178f2u
};

static inline uint32_t relay_rotr32(uint32_t x, unsigned n) { return (x >> n) | (x << (32u - n)); }

static inline uint32_t relay_load_be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static inline void relay_store_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24); p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);  p[3] = (unsigned char)v;
}

/* Process one 64-byte block (FIPS 180-4 section 6.2.2). */
static inline void relay_sha256_block(uint32_t h[8], const unsigned char *blk)
{
    uint32_t w[64], a, b, c, d, e, f, g, hh, t1, t2;
    unsigned i;
    for (i = 0; i < 16; i++)
        w[i] = relay_load_be32(blk + 4 * i);
    for (i = 16; i < 64; i++) {
        uint32_t s0 = relay_rotr32(w[i - 15], 7) ^ relay_rotr32(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = relay_rotr32(w[i - 2], 17) ^ relay_rotr32(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = h[0]; b = h[1]; c = h[2]; d = h[3]; e = h[4]; f = h[5]; g = h[6]; hh = h[7];
    for (i = 0; i < 64; i++) {
        t1 = hh + (relay_rotr32(e, 6) ^ relay_rotr32(e, 11) ^ relay_rotr32(e, 25)) + ((e & f) ^ (~e & g))
             + relay_sha256_k[i] + w[i];
        t2 = (relay_rotr32(a, 2) ^ relay_rotr32(a, 13) ^ relay_rotr32(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        hh = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
}

static RELAY_CRYPTO_UNUSED void sha256_init(Sha256 *s)
{
    memcpy(s->h, relay_sha256_h0, sizeof s->h);
    s->total = 0;
    s->used = 0;
}

static RELAY_CRYPTO_UNUSED void sha256_update(Sha256 *s, const void *data, size_t len)
{
    const unsigned char *p = (const unsigned char *)data;
    s->total += (uint64_t)len;
    if (s->used > 0) {
        size_t take = 64 - s->used;
        if (take > len)
            take = len;
        memcpy(s->block + s->used, p, take);
        s->used += take; p += take; len -= take;
        if (s->used < 64)
            return;
        relay_sha256_block(s->h, s->block);
        s->used = 0;
    }
    while (len >= 64) {
        relay_sha256_block(s->h, p);
        p += 64; len -= 64;
    }
    if (len > 0) {
        memcpy(s->block, p, len);
        s->used = len;
    }
}

static RELAY_CRYPTO_UNUSED void sha256_final(Sha256 *s, unsigned char out[32])
{
    uint64_t bits = s->total * 8u;
    unsigned i;
    /* Padding (FIPS 180-4 section 5.1.1): 0x80, zeros, then the 64-bit big-endian bit length. */
    s->block[s->used++] = 0x80;
    if (s->used > 56) {
        memset(s->block + s->used, 0, 64 - s->used);
        relay_sha256_block(s->h, s->block);
        s->used = 0;
    }
    memset(s->block + s->used, 0, 56 - s->used);
    relay_store_be32(s->block + 56, (uint32_t)(bits >> 32));
    relay_store_be32(s->block + 60, (uint32_t)bits);
    relay_sha256_block(s->h, s->block);
    for (i = 0; i < 8; i++)
        relay_store_be32(out + 4 * i, s->h[i]);
    memset(s, 0, sizeof *s);
}

static RELAY_CRYPTO_UNUSED void sha256(const void *data, size_t len, unsigned char out[32])
{
    Sha256 s;
    sha256_init(&s);
    sha256_update(&s, data, len);
    sha256_final(&s, out);
}

/* HMAC-SHA-256 of the concatenation msg1 || msg2 (msg2 may be NULL with len 0); key of any length. */
static RELAY_CRYPTO_UNUSED void hmac_sha256(const unsigned char *key, size_t klen, const unsigned char *msg1,
                                            size_t len1, const unsigned char *msg2, size_t len2,
                                            unsigned char out[32])
{
    unsigned char k0[64], pad[64], inner[32];
    Sha256 s;
    unsigned i;
    memset(k0, 0, sizeof k0);
    if (klen > 64)
        sha256(key, klen, k0);          /* RFC 2104: keys longer than B are hashed first */
    else if (klen > 0)
        memcpy(k0, key, klen);
    for (i = 0; i < 64; i++)
        pad[i] = (unsigned char)(k0[i] ^ 0x36);
    sha256_init(&s);
    sha256_update(&s, pad, 64);
    if (len1 > 0)
        sha256_update(&s, msg1, len1);
    if (msg2 != NULL && len2 > 0)
        sha256_update(&s, msg2, len2);
    sha256_final(&s, inner);
    for (i = 0; i < 64; i++)
        pad[i] = (unsigned char)(k0[i] ^ 0x5c);
    sha256_init(&s);
    sha256_update(&s, pad, 64);
    sha256_update(&s, inner, 32);
    sha256_final(&s, out);
    memset(k0, 0, sizeof k0);
    memset(pad, 0, sizeof pad);
    memset(inner, 0, sizeof inner);
}

static const char relay_b64_alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* Standard base64 with '=' padding; writes 4*((len+2)/3) chars to out (no NUL), returns that count. */
static RELAY_CRYPTO_UNUSED size_t b64_encode(const unsigned char *in, size_t len, char *out)
{
    size_t i = 0, o = 0;
    for (; i + 3 <= len; i += 3) {
        uint32_t v = ((uint32_t)in[i] << 16) | ((uint32_t)in[i + 1] << 8) | (uint32_t)in[i + 2];
        out[o++] = relay_b64_alphabet[(v >> 18) & 63];
        out[o++] = relay_b64_alphabet[(v >> 12) & 63];
        out[o++] = relay_b64_alphabet[(v >> 6) & 63];
        out[o++] = relay_b64_alphabet[v & 63];
    }
    if (len - i == 1) {
        uint32_t v = (uint32_t)in[i] << 16;
        out[o++] = relay_b64_alphabet[(v >> 18) & 63];
        out[o++] = relay_b64_alphabet[(v >> 12) & 63];
        out[o++] = '=';
        out[o++] = '=';
    } else if (len - i == 2) {
        uint32_t v = ((uint32_t)in[i] << 16) | ((uint32_t)in[i + 1] << 8);
        out[o++] = relay_b64_alphabet[(v >> 18) & 63];
        out[o++] = relay_b64_alphabet[(v >> 12) & 63];
        out[o++] = relay_b64_alphabet[(v >> 6) & 63];
        out[o++] = '=';
    }
    return o;
}

/* Value of one base64 alphabet character, or -1. */
static inline int relay_b64_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

/* Strict standard base64 decode (length a multiple of 4, '=' only as 1 or 2 final pad chars, no whitespace,
   non-zero pad bits rejected); returns the decoded length, or -1 on malformed input or when the result would
   exceed cap. */
static RELAY_CRYPTO_UNUSED long b64_decode(const char *in, size_t len, unsigned char *out, size_t cap)
{
    const unsigned char *p = (const unsigned char *)in;
    size_t pad = 0, outlen, i, o = 0, data;
    if (len % 4 != 0)
        return -1;
    if (len == 0)
        return 0;
    if (p[len - 1] == '=')
        pad = (p[len - 2] == '=') ? 2 : 1;
    outlen = len / 4 * 3 - pad;
    if (outlen > cap || outlen > (size_t)(~0UL >> 1))
        return -1;
    data = len - pad;                 /* every char before the pads must be in the alphabet (no '=') */
    for (i = 0; i < len; i += 4) {
        uint32_t v = 0;
        unsigned j, n = 0;
        for (j = 0; j < 4; j++) {
            int d;
            if (i + j >= data) {
                v <<= 6;
                continue;
            }
            d = relay_b64_value(p[i + j]);
            if (d < 0)
                return -1;
            v = (v << 6) | (uint32_t)d;
            n++;
        }
        if (n == 4) {
            out[o++] = (unsigned char)(v >> 16); out[o++] = (unsigned char)(v >> 8); out[o++] = (unsigned char)v;
        } else if (n == 3) {
            if (v & 0xffu)
                return -1;            /* non-zero pad bits */
            out[o++] = (unsigned char)(v >> 16); out[o++] = (unsigned char)(v >> 8);
        } else {                      /* n == 2 */
            if (v & 0xffffu)
                return -1;
            out[o++] = (unsigned char)(v >> 16);
        }
    }
    return (long)o;
}

/* Constant-time comparison of n bytes: 0 when equal. */
static RELAY_CRYPTO_UNUSED int ct_differ(const unsigned char *a, const unsigned char *b, size_t n)
{
    unsigned acc = 0;
    size_t i;
    for (i = 0; i < n; i++)
        acc |= (unsigned)(a[i] ^ b[i]);
    return (int)((0u - acc) >> (sizeof(unsigned) * 8 - 1));   /* 1 if acc != 0, without a branch */
}

#endif /* MULTIPROXY_RELAY_CRYPTO_H */
