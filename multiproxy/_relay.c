/* The compiled relay core: moves whole protocol messages between linked client and backend sockets, and
 * lends idle backends to clients, with no Python per message; Python sees only the events it asked for.
 *
 * Two types:
 *   Walker  - the framing rule of one direction of one protocol (header size, where the length is, how it
 *             counts, where the message type is) and the types that end a walk: `stop` types are handed
 *             to the engine before they are forwarded, the `boundary` type (PostgreSQL ReadyForQuery) ends
 *             a request, `count` types (PostgreSQL Query/Sync) open one. MySQL, whose responses have no
 *             frame of their own that ends them, declares response="mysql" for the server direction: the
 *             text protocol's answers are followed packet by packet (walk_mysql_response, below) to their
 *             end, a boundary with 'I' or 'T'. TDS declares response="tds" (a response ends at the packet with
 *             the EOM status bit) and request="tds" (a batch is relayed whole, one packet opening with SELECT:
 *             walk_tds_response and tds_request_relayable, below). feed() walks a byte vector the way the relay does;
 *             multiproxy/relay_core.py has the same rule in Python (its twin).
 *   Relay   - an epoll set of its own whose fd the caller watches from gevent's loop; run_ready() drains
 *             every ready socket: reads, walks, writes whole frames to the peer, links a client that
 *             starts a request to an idle backend (or queues it until one comes back), and unlinks the
 *             backend at the end of the transaction (boundary with status 'I' and no request pending).
 *             Only stop frames, malformed lengths, EOF/errors and data from an idle backend go to Python,
 *             as events; the relay forgets both sockets of such an event and the caller owns them again.
 *             threaded=True: a thread of the relay's own, without the GIL, waits on the epoll set and serves
 *             it; fileno() is then an eventfd that is readable when events wait, and run_ready() takes
 *             them. No Python runs per message or per wake-up; only events cost Python.
 *             listen(fd): the relay accepts clients itself. A new client's first packets (PostgreSQL's
 *             startup framing: a 4-byte length that counts itself) are answered from what the engine
 *             declared: `refuse` (the SSLRequest) gets `refusal` ("N"), a startup packet that the engine
 *             greeted before (cache_greeting) gets the same greeting; any other goes to the engine as a
 *             STARTUP event. The relay closes the clients it accepted itself at EOF or at a `hangup`
 *             frame (Terminate) between transactions, so a connect-per-transaction client costs no Python.
 *             A keyed greeting carries a fresh cancel key and hands its client over as a GREETED event
 *             (relay logins: see "Relay logins: keyed greetings" below).
 *
 * A rule may screen the bodies of some frame types (`screen`, `words`, `max_screen`): such a frame is walked
 * whole, and one holding a word (ASCII case ignored) or larger than max_screen is a stop frame. Words named in
 * `exempt` do not stop a body that is one statement opening with an `exempt_lead` (screen_exempt). With
 * hold_stops=True a linked client's stop frame waits for the boundary that answers its last request (the client
 * is not read meanwhile), so that the caller never takes over a request half answered: at the end of its
 * transaction it goes to the caller alone; inside a transaction (a boundary other than 'I', or a stop frame while
 * linked with nothing outstanding) it goes with its backend (the event's peer_fd), and the event's arg is the status
 * of that backend's last boundary ('T', 'E'), for the caller to carry the transaction on.
 * A PostgreSQL client rule may relay batches of the unnamed statement (`pg_unnamed`: Parse, Bind, Describe,
 * Execute up to a Sync, served whole or not at all; see pg_batch).
 * take_idle(), take_waiting() and remove(fd) give sockets back to the caller between transactions.
 * set_yield(True) makes the relay lend no backend by itself (a free backend goes idle, for the caller to give to
 * whoever its pool serves first); age_waiting(limit) gives back the clients that waited `limit` calls for a backend.
 *
 * Sockets stay owned (and closed) by the caller; the relay never closes a file descriptor it was given.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "_relay_crypto.h"

#define MAX_WORDS 64            /* screen words of one rule */
#define MAX_WORD 32             /* bytes of one screen word */
#define MAX_LEADS 8             /* exempt leads of one rule */

enum { EV_NONE = 0, EV_BOUNDARY = 1, EV_HANDOVER = 2, EV_MALFORMED = 3, EV_CLOSED = 4, EV_UNSOLICITED = 5,
       EV_STARTUP = 6, EV_GREETED = 7, EV_GONE = 8, EV_ANSWERED = 9, EV_QUIET = 10, EV_LOCAL = 11, EV_NAMED = 12 };

/* pg_begin: the transaction words of a lone simple Query the relay may answer itself (pg_transaction_word); a
   transaction code holds the word in its low bits (TXW_WORD) and a BEGIN's modes above them (TX_MODES) */
enum { TXW_NONE = 0, TXW_BEGIN = 1, TXW_START = 2, TXW_COMMIT = 3, TXW_ROLLBACK = 4 };
#define TXW_WORD 7

/* ---------------------------------------------------------------- the framing rule and its walker state */

typedef struct {
    int header_size;        /* bytes before the body */
    int length_offset;      /* where the length field starts in the header */
    int length_size;        /* 2, 3 or 4 bytes */
    int big_endian;
    long long length_adjust; /* frame size = length field + length_adjust */
    int type_offset;        /* the byte that names the message type, or -1 */
    int boundary;           /* type of the end-of-request frame (its first body byte is its status), or -1 */
    int max_boundary;       /* a boundary frame must arrive whole, so it may be at most this big */
    unsigned char stop[256];
    unsigned char count[256];
    unsigned char screen[256];  /* types whose body is screened for `words` (whole frames of at most max_screen) */
    long long max_screen;
    int nwords;
    unsigned char first[256];   /* by first byte: how many words start with it */
    unsigned char first_at[256];    /* by first byte: where its words start in by_first */
    unsigned char by_first[MAX_WORDS];  /* the words' indexes, ordered by first byte */
    int word_len[MAX_WORDS];
    unsigned char words[MAX_WORDS][MAX_WORD];   /* lowercase ASCII */
    unsigned char exempt_word[MAX_WORDS];       /* words that do not stop a text opening with an exempt lead (below) */
    unsigned char exempt_lead[MAX_LEADS][MAX_WORD];     /* lowercase ASCII; none (n_leads 0): no exemption */
    int exempt_lead_len[MAX_LEADS];
    int n_leads;
    int pg_unnamed;             /* PostgreSQL extended-protocol batches of the unnamed statement (pg_batch) */
    int pg_begin;               /* PostgreSQL: a lone BEGIN is EV_LOCAL, and so are COMMIT/ROLLBACK after it (lazy) */
    unsigned char mysql_begin[64];  /* MySQL: a lone BEGIN is EV_LOCAL, answered with these bytes (an OK packet) */
    size_t mysql_begin_len;
    /* MySQL (see the MySQL block below): */
    int response;           /* RESPONSE_MYSQL: walk_mysql_response() walks this direction (the server's answers) */
    int deprecate_eof;      /* CLIENT_DEPRECATE_EOF in effect: no EOF after column definitions, rows end with an OK */
    int request;            /* REQUEST_MYSQL: each packet must open a command (sequence id 0, not empty) */
} Rule;

/* A client's named prepared statements the relay may serve (Relay.set_statements; see "named statements" below):
   one block, the entries and then their bytes. */
typedef struct {
    const unsigned char *name;
    size_t name_len;
    const unsigned char *parse;     /* a Parse body preparing it as the unnamed statement: NUL, text, parameter types */
    size_t parse_len;
} Statement;

typedef struct StatementTable {
    int n;
    Statement s[];
} StatementTable;

typedef struct {
    unsigned long long remaining;   /* bytes of the current frame not walked yet; 0 at a frame start */
    unsigned long long counted;     /* frames of a `count` type started since the last take */
    /* walk_mysql_response(): */
    int mstate;                     /* MY_START, MY_COLUMNS, MY_COLUMNS_EOF, MY_ROWS */
    int mmore;                      /* the last packet held 0xFFFFFF payload bytes: a continuation follows */
    unsigned long long mcount;      /* column definitions still to come */
    int mtrans;                     /* the last response ended inside a transaction: an ERR after it says 'T' too */
    int lazy;                       /* pg_begin: a BEGIN was answered and not sent: COMMIT/ROLLBACK are EV_LOCAL too */
    unsigned long long insert_id;   /* MySQL: the last insert id other than 0 of an OK packet (the relay takes it) */
    StatementTable *stmts;          /* pg_unnamed: the named statements a batch may bind (EV_NAMED); owned */
} WalkState;

typedef struct {
    size_t consumed;    /* bytes that may be forwarded */
    int event;          /* EV_NONE: consumed everything walkable, the rest (if any) is an incomplete header */
    int arg;            /* boundary status byte, or the type of a stop / malformed frame, or -1 */
} WalkResult;

/* The rest of the current frame (st->remaining bytes), of which avail are here: how many are walked now. */
static inline size_t walk_on(WalkState *st, size_t avail) {
    size_t take = st->remaining < avail ? (size_t)st->remaining : avail;
    st->remaining -= take;
    return take;
}

/* A frame of `total` bytes starts here, with avail bytes in hand: how many are walked now (the rest later). */
static inline size_t walk_into(WalkState *st, unsigned long long total, size_t avail) {
    size_t take = total < avail ? (size_t)total : avail;
    st->remaining = total - take;
    return take;
}

static inline unsigned char lower_ascii(unsigned char ch) {
    return ch >= 'A' && ch <= 'Z' ? (unsigned char)(ch + 32) : ch;
}

/* Whether body is one statement opening with one of the rule's exempt leads: after its leading bytes up to 0x20
   (white space, and the NUL or command byte before a PostgreSQL Parse's or a MySQL COM_QUERY's text), the lead and a
   byte up to 0x20; no ';' but at the end (only white space, NUL and ';' after the first one). */
static int screen_exempt(const Rule *rule, const unsigned char *body, size_t len) {
    size_t i = 0;
    while (i < len && body[i] <= 0x20)
        i++;
    int opens = 0;
    for (int n = 0; n < rule->n_leads && !opens; n++) {
        size_t ll = (size_t)rule->exempt_lead_len[n], k = 0;
        if (len - i <= ll)
            continue;
        while (k < ll && lower_ascii(body[i + k]) == rule->exempt_lead[n][k])
            k++;
        opens = k == ll && body[i + ll] <= 0x20;
    }
    if (!opens)
        return 0;
    const unsigned char *semi = memchr(body + i, ';', len - i);
    if (semi != NULL)
        for (const unsigned char *q = semi; q < body + len; q++)
            if (*q > 0x20 && *q != ';')
                return 0;
    return 1;
}

/* Whether body holds one of the rule's words, ASCII case ignored (an exempt word not in an exempt text). */
static int screen_hit(const Rule *rule, const unsigned char *body, size_t len) {
    int exempt = -1;            /* screen_exempt(body), once a word asks */
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = lower_ascii(body[i]);
        int n = rule->first[ch];
        for (int at = rule->first_at[ch]; n > 0; at++, n--) {     /* only the words that start with ch */
            int w = rule->by_first[at];
            size_t wl = (size_t)rule->word_len[w];
            if (wl > len - i)
                continue;
            size_t k = 1;
            while (k < wl && lower_ascii(body[i + k]) == rule->words[w][k])
                k++;
            if (k == wl) {
                if (!rule->exempt_word[w])
                    return 1;
                if (exempt < 0)
                    exempt = screen_exempt(rule, body, len);
                if (!exempt)
                    return 1;
            }
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- PostgreSQL: transaction words the relay answers
 *
 * pg_begin (a rule option, PostgreSQL framing only): a simple Query whose whole text is BEGIN [WORK | TRANSACTION] or
 * START TRANSACTION, with or without the modes of TX_MODES (ISOLATION LEVEL ..., READ WRITE / ONLY, [NOT] DEFERRABLE,
 * separated by white space or one comma, each kind once), ASCII case ignored, white space (pg_space) around, one ';'
 * at the end, is EV_LOCAL before it (arg: its transaction code, TXW_BEGIN or TXW_START in the bits of TXW_WORD and
 * the modes above), whatever the screen says; while the walk state's `lazy` is set (a BEGIN answered by the relay and
 * not sent), so is one of COMMIT / END / ROLLBACK / ABORT [WORK | TRANSACTION] (TXW_COMMIT, TXW_ROLLBACK). A mode
 * given twice, AND CHAIN, comments or anything else make it an ordinary Query (BEGIN and START are screen words:
 * such a text stops, and the Python path answers it). The relay's answer is in pump(). */

/* PostgreSQL's white space between tokens (its scanner's `space`). */
static inline int pg_space(unsigned char ch) {
    return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '\f';
}

#define MAX_TX_TOKENS 16     /* words and commas of a transaction statement */
#define MAX_TX_WORD 15       /* letters of one of its words */

/* The modes of a BEGIN the relay answers: (shift, value) in the transaction code, its words and its text. Each
   category (the shift) at most once. */
static const struct {
    int shift, value, nwords;
    const char *words[4];
    const char *text;
} TX_MODES[] = {
    {3, 1, 3, {"isolation", "level", "serializable"}, "ISOLATION LEVEL SERIALIZABLE"},
    {3, 2, 4, {"isolation", "level", "repeatable", "read"}, "ISOLATION LEVEL REPEATABLE READ"},
    {3, 3, 4, {"isolation", "level", "read", "committed"}, "ISOLATION LEVEL READ COMMITTED"},
    {3, 4, 4, {"isolation", "level", "read", "uncommitted"}, "ISOLATION LEVEL READ UNCOMMITTED"},
    {6, 1, 2, {"read", "write"}, "READ WRITE"},
    {6, 2, 2, {"read", "only"}, "READ ONLY"},
    {8, 1, 1, {"deferrable"}, "DEFERRABLE"},
    {8, 2, 2, {"not", "deferrable"}, "NOT DEFERRABLE"},
};
#define N_TX_MODES ((int)(sizeof(TX_MODES) / sizeof(TX_MODES[0])))
static const int TX_MODE_FIELD[9] = {[3] = 7, [6] = 3, [8] = 3};   /* each category's bits, by shift */

/* The words and commas of text[0:len] (PostgreSQL's white space between them), lowercased into tokens: their number,
   or -1 for a byte that is neither an ASCII letter nor a comma, a word longer than MAX_TX_WORD, more than
   MAX_TX_TOKENS tokens. */
static int tx_tokens(const unsigned char *text, size_t len, char tokens[][MAX_TX_WORD + 1]) {
    int n = 0;
    size_t i = 0;
    for (;;) {
        while (i < len && pg_space(text[i]))
            i++;
        if (i == len)
            return n;
        if (n == MAX_TX_TOKENS)
            return -1;
        char *word = tokens[n++];
        if (text[i] == ',') {
            word[0] = ',';
            word[1] = 0;
            i++;
            continue;
        }
        int k = 0;
        while (i < len && !pg_space(text[i]) && text[i] != ',') {
            unsigned char ch = lower_ascii(text[i]);
            if (ch < 'a' || ch > 'z' || k == MAX_TX_WORD)
                return -1;
            word[k++] = (char)ch;
            i++;
        }
        word[k] = 0;
    }
}

/* word with the modes in tokens[at:n] (TX_MODES), or TXW_NONE: a comma only between two modes, each category once. */
static int with_modes(int word, char tokens[][MAX_TX_WORD + 1], int at, int n) {
    int code = word, seen = 0;
    while (at < n) {
        if (strcmp(tokens[at], ",") == 0) {
            if (at == n - 1 || seen == 0)
                return TXW_NONE;
            at++;
        }
        int m;
        for (m = 0; m < N_TX_MODES; m++) {
            int k = 0;
            while (k < TX_MODES[m].nwords && at + k < n && strcmp(tokens[at + k], TX_MODES[m].words[k]) == 0)
                k++;
            if (k == TX_MODES[m].nwords)
                break;
        }
        if (m == N_TX_MODES || (seen & (1 << TX_MODES[m].shift)))
            return TXW_NONE;
        seen |= 1 << TX_MODES[m].shift;
        code |= TX_MODES[m].value << TX_MODES[m].shift;
        at += TX_MODES[m].nwords;
    }
    return code;
}

/* The transaction code of a statement's text (len bytes), or TXW_NONE; mysql: MySQL's BEGIN [WORK] and START
   TRANSACTION only, with no modes (MySQL has no END, ABORT or BEGIN TRANSACTION, and the relay answers no COMMIT
   there). */
static int transaction_word(const unsigned char *body, size_t len, int mysql) {
    /* every Query comes here: what does not open with a transaction word is none, before anything else is read */
    size_t i = 0;
    while (i < len && pg_space(body[i]))
        i++;
    char lead[9];
    int k = 0;
    while (i < len && k < 8 && lower_ascii(body[i]) >= 'a' && lower_ascii(body[i]) <= 'z')
        lead[k++] = (char)lower_ascii(body[i++]);
    lead[k] = 0;
    if (strcmp(lead, "begin") != 0 && strcmp(lead, "start") != 0 && strcmp(lead, "commit") != 0 &&
        strcmp(lead, "end") != 0 && strcmp(lead, "rollback") != 0 && strcmp(lead, "abort") != 0)
        return TXW_NONE;        /* (a longer word cut to 8 letters goes on, and the whole reading judges it) */
    const unsigned char *semi = memchr(body, ';', len);
    if (semi != NULL) {     /* one ';' after the words, then only white space */
        for (const unsigned char *q = semi + 1; q < body + len; q++)
            if (!pg_space(*q))
                return TXW_NONE;
        len = (size_t)(semi - body);
    }
    char tokens[MAX_TX_TOKENS][MAX_TX_WORD + 1];
    int n = tx_tokens(body, len, tokens);
    if (n <= 0)
        return TXW_NONE;
    const char *first = tokens[0], *second = n > 1 ? tokens[1] : "";
    if (strcmp(first, ",") == 0 || strcmp(second, ",") == 0)
        return TXW_NONE;
    int plain = second[0] == 0, qualified = strcmp(second, "work") == 0 || strcmp(second, "transaction") == 0;
    if (mysql) {
        if (n > 2)
            return TXW_NONE;
        if (strcmp(first, "begin") == 0 && (plain || strcmp(second, "work") == 0))
            return TXW_BEGIN;
        return strcmp(first, "start") == 0 && strcmp(second, "transaction") == 0 ? TXW_START : TXW_NONE;
    }
    if (strcmp(first, "start") == 0)
        return strcmp(second, "transaction") == 0 ? with_modes(TXW_START, tokens, 2, n) : TXW_NONE;
    int at = qualified ? 2 : 1;
    if (strcmp(first, "begin") == 0)
        return with_modes(TXW_BEGIN, tokens, at, n);
    if (at != n)
        return TXW_NONE;
    if (strcmp(first, "commit") == 0 || strcmp(first, "end") == 0)
        return TXW_COMMIT;
    if (strcmp(first, "rollback") == 0 || strcmp(first, "abort") == 0)
        return TXW_ROLLBACK;
    return TXW_NONE;
}

/* The BEGIN of a transaction code, as the relay sends it ahead (BEGIN or START TRANSACTION, then its modes), into
   out (room for at least BEGIN_TEXT_MAX bytes): its length. */
#define BEGIN_TEXT_MAX 96
static size_t begin_text(int code, char *out) {
    size_t n = 0;
    const char *head = (code & TXW_WORD) == TXW_START ? "START TRANSACTION" : "BEGIN";
    memcpy(out, head, strlen(head));
    n = strlen(head);
    for (int m = 0; m < N_TX_MODES; m++) {
        int shift = TX_MODES[m].shift;
        if (((code >> shift) & TX_MODE_FIELD[shift]) == TX_MODES[m].value) {
            size_t tl = strlen(TX_MODES[m].text);
            out[n++] = ' ';
            memcpy(out + n, TX_MODES[m].text, tl);
            n += tl;
        }
    }
    return n;
}

/* The transaction word of a PostgreSQL Query body (its text and the NUL that ends it), or TXW_NONE. */
static int pg_transaction_word(const unsigned char *body, size_t blen) {
    if (blen < 2 || body[blen - 1] != 0 || memchr(body, 0, blen - 1) != NULL)
        return TXW_NONE;
    return transaction_word(body, blen - 1, 0);
}

/* ---------------------------------------------------------------- PostgreSQL batches of the unnamed statement
 *
 * pg_unnamed (a rule option, PostgreSQL framing only): a client frame Parse, Bind, Describe or Execute opens a batch
 * that the relay serves only whole, up to and with its Sync, when every frame of it is one the relay may serve:
 *   Parse    of the unnamed statement (first body byte 0), well formed, its body screened as a Query is (the
 *            rule's words), and directly followed by a Bind;
 *   Bind     of the unnamed portal and the unnamed statement (body bytes 0 and 1 are 0), directly after a Parse;
 *   Describe of the unnamed portal (body "P\0");
 *   Execute  of the unnamed portal (body: byte 0, then the int32 row limit);
 *   Sync     ends the batch (counted once: the batch is one request, answered by one ReadyForQuery).
 * Anything else inside (another type, a name, a Bind with no Parse right before it, a screen word, a frame length
 * below the header) makes the batch's first frame a stop frame, with nothing of the batch forwarded; so does a
 * batch longer than max_screen. A batch not whole in the buffer yet is not walked (incomplete). So a statement the
 * relay forwards is always bound at once by the same client, a Bind can only bind the statement parsed just before
 * it, and no forwarded byte belongs to a batch whose ReadyForQuery is not owed: the backend is free again at a
 * ReadyForQuery 'I' with nothing outstanding, and a held stop frame always waits for a ReadyForQuery that comes
 * (with 'T' or 'E' it then goes to the caller with the backend).
 *
 * Named statements: a walk state may hold a table of the client's named prepared statements (Relay.set_statements:
 * the name and the Parse body that prepares it, its text screened as a Parse's is). A batch whose first frame is a
 * Bind of one of them to the unnamed portal, with no Parse in the batch, is EV_NAMED at its start (arg: the
 * statement's index), walked no further. The relay then turns it into a batch of the unnamed statement, Parse of the
 * statement's text in front of a Bind of the unnamed statement (named_to_unnamed), which any backend serves, and the
 * backend drops the ParseComplete of that Parse (Conn.inject); so the statement is parsed again on every execution,
 * as PQexecParams' are, and no backend needs it prepared. With anything of the client's in flight (its answers
 * could not be told apart) or no room in the buffer, it is a stop frame instead. */

enum { PG_BATCH_INCOMPLETE = 0, PG_BATCH_RELAYED = 1, PG_BATCH_STOP = 2 };

static inline int pg_batch_opens(int type) {
    return type == 'P' || type == 'B' || type == 'D' || type == 'E';
}

/* A Parse body: name, query text (both NUL-terminated), int16 count of parameter types, that many int32s. A malformed
 * one stops at once (the Python path answers it), without waiting for the frame behind it. */
static int pg_parse_well_formed(const unsigned char *body, size_t blen) {
    const unsigned char *name_end = memchr(body, 0, blen);
    if (name_end == NULL)
        return 0;
    size_t at = (size_t)(name_end - body) + 1;
    const unsigned char *query_end = memchr(body + at, 0, blen - at);
    if (query_end == NULL)
        return 0;
    at = (size_t)(query_end - body) + 1;
    if (blen - at < 2)
        return 0;
    int n = (int16_t)((body[at] << 8) | body[at + 1]);
    return n >= 0 && blen - at - 2 == (size_t)n * 4;
}

/* The index of the statement named name[0:len] in t, or -1. */
static int statement_index(const StatementTable *t, const unsigned char *name, size_t len) {
    if (t != NULL)
        for (int i = 0; i < t->n; i++)
            if (t->s[i].name_len == len && memcmp(t->s[i].name, name, len) == 0)
                return i;
    return -1;
}

/* data[0:avail] starts with a frame pg_batch_opens: the batch's verdict, and its size in *size when relayed; a batch
 * that opens with a Bind of a statement of stmts (the named statements) has that statement's index in *named. */
static int pg_batch(const Rule *rule, const unsigned char *data, size_t avail, size_t *size,
                    const StatementTable *stmts, int *named) {
    size_t q = 0;
    int after_parse = 0;
    *named = -1;
    for (;;) {
        if (avail - q < 5)
            return q + 5 > (size_t)rule->max_screen ? PG_BATCH_STOP : PG_BATCH_INCOMPLETE;
        const unsigned char *f = data + q;
        unsigned long long total = (((unsigned long long)f[1] << 24) | ((unsigned long long)f[2] << 16) |
                                    ((unsigned long long)f[3] << 8) | f[4]) + 1;
        int type = f[0];
        if (total < 5 || q + total > (unsigned long long)rule->max_screen)
            return PG_BATCH_STOP;
        if (avail - q < total)
            return PG_BATCH_INCOMPLETE;
        const unsigned char *body = f + 5;
        size_t blen = (size_t)total - 5;
        if (after_parse && type != 'B')
            return PG_BATCH_STOP;
        int ok;
        switch (type) {
        case 'P':
            ok = *named < 0 && blen >= 1 && body[0] == 0 && pg_parse_well_formed(body, blen) &&
                 !screen_hit(rule, body, blen);
            after_parse = 1;
            break;
        case 'B':
            if (after_parse) {
                ok = blen >= 2 && body[0] == 0 && body[1] == 0;
            } else if (q == 0 && stmts != NULL && blen >= 2 && body[0] == 0 && body[1] != 0) {
                const unsigned char *name_end = memchr(body + 1, 0, blen - 1);
                *named = name_end ? statement_index(stmts, body + 1, (size_t)(name_end - body - 1)) : -1;
                ok = *named >= 0;
            } else {
                ok = 0;
            }
            after_parse = 0;
            break;
        case 'D':
            ok = blen == 2 && body[0] == 'P' && body[1] == 0;
            break;
        case 'E':
            ok = blen == 5 && body[0] == 0;
            break;
        case 'S':
            if (blen != 0)
                return PG_BATCH_STOP;
            *size = q + (size_t)total;
            if (*named >= 0 && *size + 5 + stmts->s[*named].parse_len > (size_t)rule->max_screen +
                                                                         stmts->s[*named].name_len)
                return PG_BATCH_STOP;   /* made a batch of the unnamed statement, it would be too big to relay */
            return PG_BATCH_RELAYED;
        default:
            ok = 0;
        }
        if (!ok)
            return PG_BATCH_STOP;
        q += (size_t)total;
    }
}

/* ---------------------------------------------------------------- MySQL: the server's responses, the client's commands
 *
 * A MySQL response has no frame of its own that ends it: walk_mysql_response() follows the text protocol's answer
 * to COM_QUERY / COM_PING packet by packet. The first packet is OK (0x00), ERR (0xFF), a LOCAL INFILE request
 * (0xFB) or a column count (a length-encoded integer); a column count is followed by that many column definitions,
 * an EOF (unless CLIENT_DEPRECATE_EOF), rows, and an EOF (or, with CLIENT_DEPRECATE_EOF, an OK with the 0xFE
 * header) or an ERR. A packet of 0xFFFFFF payload bytes continues in the next one, which has no type byte.
 * SERVER_MORE_RESULTS_EXISTS in an end's status flags starts the next result of the same response. At the end of
 * a response the walk stops with EV_BOUNDARY and the status 'T' when SERVER_STATUS_IN_TRANS is set, else 'I'.
 * An ERR carries no status flags: it ends the response with the status of the response before it on the same
 * connection ('I' at first): a failed statement opens no transaction, and one that fails inside a transaction
 * leaves it open as far as the walk can tell (an error that rolled it back shows in the next answer's 'I').
 * A LOCAL INFILE request is EV_MALFORMED before it (the screen stops LOAD DATA: no relayed request asks for it).
 * An OK packet's last insert id other than 0 is kept in the walk state (insert_id): the relay gives it to the client
 * the answer was for (Conn.insert_id), and the caller reads it with insert_id(fd) when it takes the client back, so
 * that the engine answers SELECT LAST_INSERT_ID() as the server would after an INSERT the relay served.
 * The packets the walk must read whole (the first of each result and the ends) may be at most max_boundary bytes.
 * REQUEST_MYSQL (the client direction, with the generic walk): a packet that does not open a command (sequence id
 * not 0, or empty) is EV_MALFORMED before it.
 */

enum { RESPONSE_NONE = 0, RESPONSE_MYSQL = 1, RESPONSE_TDS = 2 };
enum { REQUEST_NONE = 0, REQUEST_MYSQL = 1, REQUEST_TDS = 2 };
enum { MY_START = 0, MY_COLUMNS = 1, MY_COLUMNS_EOF = 2, MY_ROWS = 3 };
#define MY_MAX_PAYLOAD 0xFFFFFFu
#define MY_COM_QUERY 0x03
#define MY_STATUS_IN_TRANS 0x0001
#define MY_MORE_RESULTS_EXISTS 0x0008

/* A length-encoded integer at p[*pos] (p holds len bytes): 0 and *pos past it, or -1 (none, or cut short). */
static int mysql_lenenc(const unsigned char *p, size_t len, size_t *pos, unsigned long long *value) {
    if (*pos >= len)
        return -1;
    unsigned char first = p[*pos];
    if (first < 0xFB) {
        *value = first;
        *pos += 1;
        return 0;
    }
    size_t size = first == 0xFC ? 2 : first == 0xFD ? 3 : first == 0xFE ? 8 : 0;
    if (size == 0 || *pos + 1 + size > len)         /* 0xFB (NULL) and 0xFF are no integers */
        return -1;
    unsigned long long v = 0;
    for (size_t i = 0; i < size; i++)
        v |= (unsigned long long)p[*pos + 1 + i] << (8 * i);
    *value = v;
    *pos += 1 + size;
    return 0;
}

/* The status flags of an OK packet (payload[0] is its header): affected rows and last insert id come first; -1 when
 * the payload is too short. */
static long mysql_ok_status(const unsigned char *payload, size_t len) {
    size_t pos = 1;
    unsigned long long skipped;
    if (mysql_lenenc(payload, len, &pos, &skipped) < 0 || mysql_lenenc(payload, len, &pos, &skipped) < 0 ||
        pos + 2 > len)
        return -1;
    return (long)payload[pos] | ((long)payload[pos + 1] << 8);
}

/* The last insert id of an OK packet (payload[0] is its header), 0 when it has none or is too short. */
static unsigned long long mysql_ok_insert_id(const unsigned char *payload, size_t len) {
    size_t pos = 1;
    unsigned long long affected, insert_id;
    if (mysql_lenenc(payload, len, &pos, &affected) < 0 || mysql_lenenc(payload, len, &pos, &insert_id) < 0)
        return 0;
    return insert_id;
}

/* The status flags of an EOF packet (0xFE, warnings, status); -1 when it is too short. */
static long mysql_eof_status(const unsigned char *payload, size_t len) {
    return len < 5 ? -1 : (long)payload[3] | ((long)payload[4] << 8);
}

static int mysql_request_bad(const unsigned char *h, unsigned long long length) {
    return h[3] != 0 || length == 0;
}

static WalkResult walk_mysql_response(const Rule *rule, WalkState *st, const unsigned char *data, size_t len) {
    WalkResult res = {0, EV_NONE, -1};
    size_t pos = 0;
    while (pos < len) {
        if (st->remaining) {
            pos += walk_on(st, len - pos);
            continue;
        }
        size_t avail = len - pos;
        if (avail < 4)
            break;
        const unsigned char *h = data + pos;
        size_t length = (size_t)h[0] | ((size_t)h[1] << 8) | ((size_t)h[2] << 16);
        size_t total = length + 4;
        int whole = 0;      /* the first packet of a result, or an end: read whole */
        if (st->mmore) {
            st->mmore = length == MY_MAX_PAYLOAD;   /* a continuation: no type byte */
        } else {
            if (length == 0) {
                res.event = EV_MALFORMED;
                break;
            }
            if (avail < 5)
                break;
            int head = h[4];
            int state = st->mstate;
            if (state == MY_START || state == MY_COLUMNS_EOF)
                whole = 1;
            else if (state == MY_ROWS && length < MY_MAX_PAYLOAD &&
                     (head == 0xFF || (head == 0xFE && (rule->deprecate_eof || length < 9))))
                whole = 1;
            if (!whole) {
                if (state == MY_COLUMNS && --st->mcount == 0)
                    st->mstate = rule->deprecate_eof ? MY_ROWS : MY_COLUMNS_EOF;
                st->mmore = length == MY_MAX_PAYLOAD;
            } else {
                if (total > (size_t)rule->max_boundary || (state == MY_START && head == 0xFB)) {
                    res.event = EV_MALFORMED;       /* too big to be read whole, or LOCAL INFILE */
                    res.arg = head;
                    break;
                }
                if (avail < total)
                    break;
                const unsigned char *payload = h + 4;
                long status = -1;
                int end = 1;
                if (head == 0xFF) {
                    status = 0;                     /* ERR: no flags; see above */
                } else if (state == MY_START) {
                    if (head == 0x00) {
                        status = mysql_ok_status(payload, length);
                        unsigned long long insert_id = mysql_ok_insert_id(payload, length);
                        if (insert_id)
                            st->insert_id = insert_id;  /* (an INSERT's: the caller keeps it for LAST_INSERT_ID()) */
                    } else if (head == 0xFE && length < 9) {
                        status = mysql_eof_status(payload, length);
                    } else {
                        size_t at = 0;
                        unsigned long long columns = 0;
                        if (mysql_lenenc(payload, length, &at, &columns) == 0 && columns > 0 && at == length) {
                            st->mcount = columns;
                            st->mstate = MY_COLUMNS;
                            status = 0;
                        }
                        end = 0;
                    }
                } else if (state == MY_COLUMNS_EOF) {
                    if (head == 0xFE && length < 9) {
                        status = mysql_eof_status(payload, length);
                        st->mstate = MY_ROWS;
                    }
                    end = 0;
                } else {                            /* MY_ROWS: the terminator */
                    status = rule->deprecate_eof ? mysql_ok_status(payload, length)
                                                 : mysql_eof_status(payload, length);
                }
                if (status < 0) {
                    res.event = EV_MALFORMED;
                    res.arg = head;
                    break;
                }
                if (end) {
                    st->mstate = MY_START;
                    if (head == 0xFF || !(status & MY_MORE_RESULTS_EXISTS)) {
                        pos += total;
                        res.event = EV_BOUNDARY;
                        if (head != 0xFF)
                            st->mtrans = (status & MY_STATUS_IN_TRANS) != 0;
                        res.arg = st->mtrans ? 'T' : 'I';
                        break;
                    }
                }
            }
        }
        pos += walk_into(st, (unsigned long long)total, avail);
    }
    res.consumed = pos;
    return res;
}

/* ---------------------------------------------------------------- TDS: the server's responses, the client's batches
 *
 * RESPONSE_TDS (the server direction): a response is one message, packets of type 0x04 (tabular result) whose last
 * has the EOM status bit (0x01). The walk stops after an EOM packet with EV_BOUNDARY and the status 'I' (the engine's
 * request check lets through only batches that cannot leave a transaction open); an EOM packet must arrive whole, at
 * most max_boundary bytes. A packet of another type, or shorter than its header, is EV_MALFORMED before it.
 * REQUEST_TDS (the client direction, on a screened type, with the generic walk): after the screen, a packet whose
 * status is not EOM alone (a message of several packets, RESETCONNECTION, IGNORE) or whose SQL text (UTF-16LE, after
 * the ALL_HEADERS its first 4 bytes measure) does not open with SELECT (after white space) is a stop frame: the Python
 * path serves it. A bare procedure name first in a batch runs the procedure, which might open a transaction.
 */

#define TDS_TABULAR_RESULT 0x04
#define TDS_STATUS_EOM 0x01

static int tds_utf16_space(const unsigned char *p) {
    return p[1] == 0 && (p[0] == ' ' || p[0] == '\t' || p[0] == '\r' || p[0] == '\n');
}

/* Whether a whole client packet h (total bytes, 8-byte header) may be relayed: EOM alone, text opening with SELECT. */
static int tds_request_relayable(const unsigned char *h, size_t total) {
    static const char select_word[] = "select";
    if (h[1] != TDS_STATUS_EOM || total < 12)
        return 0;
    const unsigned char *body = h + 8;
    size_t len = total - 8;
    size_t headers = (size_t)body[0] | ((size_t)body[1] << 8) | ((size_t)body[2] << 16) | ((size_t)body[3] << 24);
    if (headers < 4 || headers > len)
        return 0;
    size_t pos = headers;
    while (pos + 2 <= len && tds_utf16_space(body + pos))
        pos += 2;
    for (int i = 0; i < 6; i++, pos += 2) {
        if (pos + 2 > len || body[pos + 1] != 0 || lower_ascii(body[pos]) != (unsigned char)select_word[i])
            return 0;
    }
    if (pos + 2 > len)
        return 1;
    unsigned char next = lower_ascii(body[pos]);
    return !(body[pos + 1] == 0 && ((next >= 'a' && next <= 'z') || (next >= '0' && next <= '9') || next == '_' ||
                                     next == '@' || next == '#' || next == '$'));
}

static WalkResult walk_tds_response(const Rule *rule, WalkState *st, const unsigned char *data, size_t len) {
    WalkResult res = {0, EV_NONE, -1};
    size_t pos = 0;
    while (pos < len) {
        if (st->remaining) {
            pos += walk_on(st, len - pos);
            continue;
        }
        size_t avail = len - pos;
        if (avail < 8)
            break;
        const unsigned char *h = data + pos;
        size_t total = ((size_t)h[2] << 8) | h[3];
        if (h[0] != TDS_TABULAR_RESULT || total < 8) {
            res.event = EV_MALFORMED;
            res.arg = h[0];
            break;
        }
        if (h[1] & TDS_STATUS_EOM) {
            if (total > (size_t)rule->max_boundary) {
                res.event = EV_MALFORMED;
                res.arg = h[0];
                break;
            }
            if (avail < total)
                break;
            pos += total;
            res.event = EV_BOUNDARY;
            res.arg = 'I';
            break;
        }
        pos += walk_into(st, (unsigned long long)total, avail);
    }
    res.consumed = pos;
    return res;
}

static WalkResult walk(const Rule *rule, WalkState *st, const unsigned char *data, size_t len) {
    if (rule->response == RESPONSE_MYSQL)
        return walk_mysql_response(rule, st, data, len);
    if (rule->response == RESPONSE_TDS)
        return walk_tds_response(rule, st, data, len);
    WalkResult res = {0, EV_NONE, -1};
    size_t pos = 0;
    while (pos < len) {
        if (st->remaining) {
            pos += walk_on(st, len - pos);
            continue;
        }
        size_t avail = len - pos;
        if (avail < (size_t)rule->header_size)
            break;
        const unsigned char *h = data + pos;
        unsigned long long length = 0;
        for (int i = 0; i < rule->length_size; i++) {
            int k = rule->big_endian ? i : rule->length_size - 1 - i;
            length = (length << 8) | h[rule->length_offset + k];
        }
        long long total = (long long)length + rule->length_adjust;
        int type = -1;
        if (rule->type_offset >= 0 && total > rule->type_offset) {
            if (avail <= (size_t)rule->type_offset)
                break;
            type = h[rule->type_offset];
        }
        if (rule->request == REQUEST_MYSQL && mysql_request_bad(h, length)) {
            res.event = EV_MALFORMED;
            res.arg = type;
            break;
        }
        if (type >= 0 && rule->stop[type]) {
            res.event = EV_HANDOVER;
            res.arg = type;
            break;
        }
        if (rule->pg_unnamed && pg_batch_opens(type)) {
            size_t size = 0;
            int named;
            int verdict = pg_batch(rule, h, avail, &size, st->stmts, &named);
            if (verdict == PG_BATCH_INCOMPLETE)
                break;
            if (verdict == PG_BATCH_STOP) {
                res.event = EV_HANDOVER;
                res.arg = type;
                break;
            }
            if (named >= 0) {           /* for the relay to make it a batch of the unnamed statement */
                res.event = EV_NAMED;
                res.arg = named;
                break;
            }
            st->counted++;
            pos += size;
            continue;
        }
        if (total < rule->header_size) {
            res.event = EV_MALFORMED;
            res.arg = type;
            break;
        }
        if (type >= 0 && type == rule->boundary) {
            if (total <= rule->header_size || total > rule->max_boundary) {
                res.event = EV_MALFORMED;
                res.arg = type;
                break;
            }
            if (avail < (size_t)total)
                break;
            pos += (size_t)total;
            res.event = EV_BOUNDARY;
            res.arg = h[rule->header_size];
            break;
        }
        if (type >= 0 && rule->screen[type]) {
            /* a screened frame is walked whole: too big to hold, or holding a word, it goes to the caller */
            if (total > rule->max_screen) {
                res.event = EV_HANDOVER;
                res.arg = type;
                break;
            }
            if (avail < (size_t)total)
                break;
            if (rule->pg_begin && type == 'Q') {
                int word = pg_transaction_word(h + 5, (size_t)total - 5);
                int begin = (word & TXW_WORD) == TXW_BEGIN || (word & TXW_WORD) == TXW_START;
                if (begin || (word != TXW_NONE && st->lazy)) {
                    res.event = EV_LOCAL;
                    res.arg = word;
                    break;
                }
            }
            if (rule->mysql_begin_len && type == MY_COM_QUERY && total > 5) {
                int word = transaction_word(h + 5, (size_t)total - 5, 1);
                if (word != TXW_NONE) {
                    res.event = EV_LOCAL;
                    res.arg = word;
                    break;
                }
            }
            if (screen_hit(rule, h + rule->header_size, (size_t)total - (size_t)rule->header_size)) {
                res.event = EV_HANDOVER;
                res.arg = type;
                break;
            }
            if (rule->request == REQUEST_TDS && !tds_request_relayable(h, (size_t)total)) {
                res.event = EV_HANDOVER;
                res.arg = type;
                break;
            }
        }
        if (type >= 0 && rule->count[type])
            st->counted++;
        pos += walk_into(st, (unsigned long long)total, avail);
    }
    res.consumed = pos;
    return res;
}

static int set_from_bytes(PyObject *obj, unsigned char *set, const char *what) {
    if (obj == NULL || obj == Py_None)
        return 0;
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0) {
        PyErr_Format(PyExc_TypeError, "%s: expected bytes", what);
        return -1;
    }
    for (Py_ssize_t i = 0; i < view.len; i++)
        set[((unsigned char *)view.buf)[i]] = 1;
    PyBuffer_Release(&view);
    return 0;
}

static int rule_init(Rule *rule, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"header_size", "length_offset", "length_size", "big_endian", "length_adjust",
                             "type_offset", "stop", "count", "boundary", "max_boundary", "screen", "words",
                             "max_screen", "pg_unnamed", "response", "deprecate_eof", "request", "exempt_lead",
                             "exempt", "pg_begin", "mysql_begin", NULL};
    PyObject *stop = NULL, *count = NULL, *screen = NULL, *words = NULL, *exempt = NULL, *exempt_lead = NULL;
    const char *mysql_begin = NULL;
    Py_ssize_t mysql_begin_len = 0;
    const char *response = NULL, *request = NULL;
    memset(rule, 0, sizeof(*rule));
    rule->type_offset = -1;
    rule->boundary = -1;
    rule->max_boundary = 4096;
    rule->max_screen = 4096;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiipL|iOOiiOOLpzpzOOpy#", kwlist, &rule->header_size,
                                     &rule->length_offset, &rule->length_size, &rule->big_endian, &rule->length_adjust,
                                     &rule->type_offset, &stop, &count, &rule->boundary, &rule->max_boundary,
                                     &screen, &words, &rule->max_screen, &rule->pg_unnamed, &response,
                                     &rule->deprecate_eof, &request, &exempt_lead, &exempt,
                                     &rule->pg_begin, &mysql_begin, &mysql_begin_len))
        return -1;
    if (mysql_begin_len > (Py_ssize_t)sizeof(rule->mysql_begin)) {
        PyErr_Format(PyExc_ValueError, "mysql_begin: at most %d bytes", (int)sizeof(rule->mysql_begin));
        return -1;
    }
    if (mysql_begin_len)
        memcpy(rule->mysql_begin, mysql_begin, (size_t)mysql_begin_len);
    rule->mysql_begin_len = (size_t)mysql_begin_len;
    if (exempt_lead != NULL && exempt_lead != Py_None) {
        /* one lead (bytes; empty: none) or a sequence of them */
        PyObject *leads = PyBytes_Check(exempt_lead) ? PyTuple_Pack(1, exempt_lead)
                                                     : PySequence_Tuple(exempt_lead);
        if (leads == NULL)
            return -1;
        int bad = PyTuple_GET_SIZE(leads) > MAX_LEADS;
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(leads) && !bad; i++) {
            PyObject *lead = PyTuple_GET_ITEM(leads, i);
            if (!PyBytes_Check(lead) || PyBytes_GET_SIZE(lead) > MAX_WORD) {
                bad = 1;
                break;
            }
            Py_ssize_t ll = PyBytes_GET_SIZE(lead);
            if (ll == 0)
                continue;
            for (Py_ssize_t k = 0; k < ll; k++)
                rule->exempt_lead[rule->n_leads][k] = lower_ascii((unsigned char)PyBytes_AS_STRING(lead)[k]);
            rule->exempt_lead_len[rule->n_leads++] = (int)ll;
        }
        Py_DECREF(leads);
        if (bad) {
            PyErr_Format(PyExc_ValueError, "exempt_lead: bytes, or at most %d of them, each at most %d bytes",
                         MAX_LEADS, MAX_WORD);
            return -1;
        }
    }
    if (response && *response && strcmp(response, "mysql") != 0 && strcmp(response, "tds") != 0) {
        PyErr_SetString(PyExc_ValueError, "response: \"mysql\", \"tds\" or none");
        return -1;
    }
    if (request && *request && strcmp(request, "mysql") != 0 && strcmp(request, "tds") != 0) {
        PyErr_SetString(PyExc_ValueError, "request: \"mysql\", \"tds\" or none");
        return -1;
    }
    rule->response = !(response && *response) ? RESPONSE_NONE
                     : strcmp(response, "tds") == 0 ? RESPONSE_TDS : RESPONSE_MYSQL;
    rule->request = !(request && *request) ? REQUEST_NONE : strcmp(request, "tds") == 0 ? REQUEST_TDS : REQUEST_MYSQL;
    if ((rule->response == RESPONSE_TDS || rule->request == REQUEST_TDS) &&
        (rule->header_size != 8 || rule->length_offset != 2 || rule->length_size != 2 || !rule->big_endian ||
         rule->length_adjust != 0 || rule->type_offset != 0 || (rule->response == RESPONSE_TDS && rule->max_boundary < 8))) {
        PyErr_SetString(PyExc_ValueError, "response=\"tds\" / request=\"tds\" need the TDS framing");
        return -1;
    }
    if (rule->response == RESPONSE_MYSQL &&
        (rule->header_size != 4 || rule->length_offset != 0 || rule->length_size != 3 || rule->big_endian ||
         rule->length_adjust != 4 || rule->max_boundary < 5)) {
        PyErr_SetString(PyExc_ValueError, "response=\"mysql\" needs the MySQL framing");
        return -1;
    }
    if (rule->request == REQUEST_MYSQL && (rule->header_size != 4 || rule->length_offset != 0 ||
                                           rule->length_size != 3 || rule->big_endian || rule->length_adjust != 4)) {
        PyErr_SetString(PyExc_ValueError, "request=\"mysql\" needs the MySQL framing");
        return -1;
    }
    if (rule->mysql_begin_len && (rule->request != REQUEST_MYSQL || rule->type_offset != 4)) {
        PyErr_SetString(PyExc_ValueError, "mysql_begin: only with request=\"mysql\" (the MySQL framing)");
        return -1;
    }
    if (rule->header_size < 1 || rule->length_size < 1 || rule->length_size > 4 || rule->length_offset < 0 ||
        rule->length_offset + rule->length_size > rule->header_size || rule->type_offset < -1 ||
        rule->type_offset > 255 || rule->boundary < -1 || rule->boundary > 255 || rule->max_boundary < 1 ||
        rule->max_screen < rule->header_size) {
        PyErr_SetString(PyExc_ValueError, "inconsistent framing rule");
        return -1;
    }
    if ((rule->pg_unnamed || rule->pg_begin) &&
        !(rule->header_size == 5 && rule->length_offset == 1 && rule->length_size == 4 && rule->big_endian &&
          rule->length_adjust == 1 && rule->type_offset == 0)) {
        PyErr_SetString(PyExc_ValueError, "pg_unnamed, pg_begin: only with PostgreSQL's framing");
        return -1;
    }
    if (set_from_bytes(stop, rule->stop, "stop") < 0 || set_from_bytes(count, rule->count, "count") < 0 ||
        set_from_bytes(screen, rule->screen, "screen") < 0)
        return -1;
    if (words != NULL && words != Py_None) {
        PyObject *seq = PySequence_Fast(words, "words: expected a sequence of bytes");
        if (seq == NULL)
            return -1;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
        if (n > MAX_WORDS) {
            Py_DECREF(seq);
            PyErr_Format(PyExc_ValueError, "words: at most %d", MAX_WORDS);
            return -1;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *word = PySequence_Fast_GET_ITEM(seq, i);
            if (!PyBytes_Check(word) || PyBytes_GET_SIZE(word) < 1 || PyBytes_GET_SIZE(word) > MAX_WORD) {
                Py_DECREF(seq);
                PyErr_Format(PyExc_ValueError, "words: each 1 to %d bytes", MAX_WORD);
                return -1;
            }
            const unsigned char *w = (const unsigned char *)PyBytes_AS_STRING(word);
            int wl = (int)PyBytes_GET_SIZE(word);
            for (int k = 0; k < wl; k++)
                rule->words[i][k] = lower_ascii(w[k]);
            rule->word_len[i] = wl;
        }
        rule->nwords = (int)n;
        Py_DECREF(seq);
        memset(rule->first, 0, sizeof(rule->first));
        int at = 0;             /* the words' indexes by first byte (screen_hit looks only at those of a byte) */
        for (int ch = 0; ch < 256; ch++) {
            rule->first_at[ch] = (unsigned char)at;
            for (int i = 0; i < rule->nwords; i++)
                if (rule->words[i][0] == ch) {
                    rule->by_first[at++] = (unsigned char)i;
                    rule->first[ch]++;
                }
        }
    }
    if (exempt != NULL && exempt != Py_None) {
        PyObject *seq = PySequence_Fast(exempt, "exempt: expected a sequence of bytes");
        if (seq == NULL)
            return -1;
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
            PyObject *word = PySequence_Fast_GET_ITEM(seq, i);
            int found = -1;
            if (PyBytes_Check(word))
                for (int w = 0; w < rule->nwords && found < 0; w++) {
                    Py_ssize_t wl = PyBytes_GET_SIZE(word);
                    const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(word);
                    int same = wl == rule->word_len[w];
                    for (Py_ssize_t k = 0; same && k < wl; k++)
                        same = lower_ascii(b[k]) == rule->words[w][k];
                    if (same)
                        found = w;
                }
            if (found < 0) {
                Py_DECREF(seq);
                PyErr_SetString(PyExc_ValueError, "exempt: each one of the words");
                return -1;
            }
            rule->exempt_word[found] = 1;
        }
        Py_DECREF(seq);
    }
    return 0;
}

/* ---------------------------------------------------------------- named statements: a client's table */

#define MAX_STATEMENT_NAME 63

/* Whether name -> parse (bytes) goes in a table for rule: a name of 1 to MAX_STATEMENT_NAME bytes with no NUL, a
   well-formed Parse body of the unnamed statement whose text holds no screen word, small enough to relay. */
static int statement_usable(const Rule *rule, PyObject *name, PyObject *parse) {
    Py_ssize_t nl = PyBytes_GET_SIZE(name), pl = PyBytes_GET_SIZE(parse);
    const unsigned char *nb = (const unsigned char *)PyBytes_AS_STRING(name);
    const unsigned char *pb = (const unsigned char *)PyBytes_AS_STRING(parse);
    return nl >= 1 && nl <= MAX_STATEMENT_NAME && memchr(nb, 0, (size_t)nl) == NULL && pl >= 1 && pb[0] == 0 &&
           5 + (size_t)pl <= (size_t)rule->max_screen && pg_parse_well_formed(pb, (size_t)pl) &&
           !screen_hit(rule, pb, (size_t)pl);
}

/* The table of a dict {name: Parse body} (None or no usable entry: NULL, *failed 0); NULL with *failed 1 and an
   exception set when it cannot be made. */
static StatementTable *statements_from(const Rule *rule, PyObject *mapping, int *failed) {
    *failed = 0;
    if (mapping == Py_None)
        return NULL;
    if (!PyDict_Check(mapping)) {
        PyErr_SetString(PyExc_TypeError, "statements: a dict of bytes names to bytes Parse bodies, or None");
        *failed = 1;
        return NULL;
    }
    Py_ssize_t pos = 0;
    PyObject *name, *parse;
    size_t bytes = 0;
    int n = 0;
    while (PyDict_Next(mapping, &pos, &name, &parse)) {
        if (!PyBytes_Check(name) || !PyBytes_Check(parse)) {
            PyErr_SetString(PyExc_TypeError, "statements: a dict of bytes names to bytes Parse bodies, or None");
            *failed = 1;
            return NULL;
        }
        if (statement_usable(rule, name, parse)) {
            n++;
            bytes += (size_t)PyBytes_GET_SIZE(name) + (size_t)PyBytes_GET_SIZE(parse);
        }
    }
    if (n == 0)
        return NULL;
    StatementTable *t = PyMem_RawMalloc(sizeof(StatementTable) + (size_t)n * sizeof(Statement) + bytes);
    if (t == NULL) {
        PyErr_NoMemory();
        *failed = 1;
        return NULL;
    }
    unsigned char *at = (unsigned char *)(t->s + n);
    t->n = 0;
    pos = 0;
    while (PyDict_Next(mapping, &pos, &name, &parse)) {
        if (!statement_usable(rule, name, parse))
            continue;
        Statement *s = &t->s[t->n++];
        s->name_len = (size_t)PyBytes_GET_SIZE(name);
        s->parse_len = (size_t)PyBytes_GET_SIZE(parse);
        memcpy(at, PyBytes_AS_STRING(name), s->name_len);
        s->name = at;
        at += s->name_len;
        memcpy(at, PyBytes_AS_STRING(parse), s->parse_len);
        s->parse = at;
        at += s->parse_len;
    }
    return t;
}

/* ---------------------------------------------------------------- Walker: the rule and one state, for tests */

typedef struct {
    PyObject_HEAD
    Rule rule;
    WalkState st;
} WalkerObject;

static int Walker_init(WalkerObject *self, PyObject *args, PyObject *kwds) {
    PyMem_RawFree(self->st.stmts);
    memset(&self->st, 0, sizeof(self->st));
    return rule_init(&self->rule, args, kwds);
}

static PyObject *Walker_feed(WalkerObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    WalkResult res = walk(&self->rule, &self->st, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return Py_BuildValue("(nii)", (Py_ssize_t)res.consumed, res.event, res.arg);
}

static PyObject *Walker_set_statements(WalkerObject *self, PyObject *mapping) {
    int failed;
    StatementTable *t = statements_from(&self->rule, mapping, &failed);
    if (failed)
        return NULL;
    PyMem_RawFree(self->st.stmts);
    self->st.stmts = t;
    return PyLong_FromLong(t ? t->n : 0);
}

static void Walker_dealloc(WalkerObject *self) {
    PyMem_RawFree(self->st.stmts);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Walker_take_count(WalkerObject *self, PyObject *unused) {
    unsigned long long n = self->st.counted;
    self->st.counted = 0;
    return PyLong_FromUnsignedLongLong(n);
}

static PyObject *Walker_get_remaining(WalkerObject *self, void *closure) {
    return PyLong_FromUnsignedLongLong(self->st.remaining);
}

static PyMethodDef Walker_methods[] = {
    {"feed", (PyCFunction)Walker_feed, METH_O,
     "feed(data) -> (consumed, event, arg): walk data from the walker's state; see relay_core.Walker."},
    {"take_count", (PyCFunction)Walker_take_count, METH_NOARGS,
     "Frames of a `count` type started since the last take."},
    {"set_statements", (PyCFunction)Walker_set_statements, METH_O,
     "set_statements(dict or None) -> int: the named statements a batch may bind ({name: Parse body of the unnamed "
     "statement}); how many were usable. See relay_core.Walker."},
    {NULL},
};

static PyObject *Walker_get_lazy(WalkerObject *self, void *closure) {
    return PyBool_FromLong(self->st.lazy);
}

static PyObject *Walker_get_insert_id(WalkerObject *self, void *closure) {
    return PyLong_FromUnsignedLongLong(self->st.insert_id);
}

static int Walker_set_lazy(WalkerObject *self, PyObject *value, void *closure) {
    int on = value ? PyObject_IsTrue(value) : 0;
    if (on < 0)
        return -1;
    self->st.lazy = on;
    return 0;
}

static PyGetSetDef Walker_getset[] = {
    {"remaining", (getter)Walker_get_remaining, NULL, "bytes of the current frame not walked yet", NULL},
    {"insert_id", (getter)Walker_get_insert_id, NULL,
     "response=\"mysql\": the last insert id other than 0 an OK packet carried (0: none yet)", NULL},
    {"lazy", (getter)Walker_get_lazy, (setter)Walker_set_lazy,
     "pg_begin: a BEGIN was answered and not sent (COMMIT and ROLLBACK are LOCAL events too)", NULL},
    {NULL},
};

static PyTypeObject WalkerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "multiproxy._relay.Walker",
    .tp_basicsize = sizeof(WalkerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The framing rule of one direction and its walk state.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Walker_init,
    .tp_dealloc = (destructor)Walker_dealloc,
    .tp_methods = Walker_methods,
    .tp_getset = Walker_getset,
};

/* ---------------------------------------------------------------- Relay */

enum { ROLE_CLIENT = 0, ROLE_BACKEND = 1, ROLE_LISTENER = 2 };

#define MAX_STARTUP 10000       /* PostgreSQL's own limit on a startup packet */

#define SCRAM_NONCE_RAW 18      /* random bytes of the relay's part of a SCRAM nonce (as PostgreSQL's) */
#define SCRAM_NONCE 24          /* their base64 */
#define SCRAM_TAIL_MAX 160      /* ",s=<salt>,i=<iterations>" of a greeting's verifier */
#define SCRAM_TEXT_MAX 512      /* a client-first-message-bare the relay verifies (a longer one: the engine's) */

typedef struct Greeting {
    struct Greeting *next;
    long key_at;                /* >= 0: a keyed greeting (relay logins: a fresh cancel key written here) */
    int template_id;            /* a keyed greeting's id, the arg of its GREETED events */
    int keep;                   /* a keyed greeting's client stays in the relay as a client */
    int scram;                  /* a keyed greeting sent after a SCRAM-SHA-256 exchange with these keys */
    unsigned char stored_key[32], server_key[32];
    size_t tail_len;
    char tail[SCRAM_TAIL_MAX];  /* the end of its server-first-message: ",s=<salt>,i=<iterations>" */
    size_t startup_len, reply_len;
    unsigned char *reply;
    unsigned char startup[];
} Greeting;

/* A client's SCRAM-SHA-256 exchange in the relay (relay logins with scram: see "SCRAM" below). */
typedef struct Login {
    int template_id;            /* the greeting it began with */
    int phase;                  /* 1: awaits SASLInitialResponse, 2: awaits SASLResponse */
    int gs2_y;                  /* its GS2 header was "y,," (else "n,,") */
    size_t answered;            /* buf[0:answered]: what the relay answered (startup packet, SASLInitialResponse) */
    size_t bare_at, bare_len;   /* its client-first-message-bare in buf */
    size_t cnonce_len;          /* the client's nonce: the end of the bare message */
    char snonce[SCRAM_NONCE];   /* the relay's part of the nonce */
} Login;

typedef struct Conn {
    int fd;
    int role;
    struct Conn *peer;          /* the linked other side, or NULL */
    struct Conn *next;          /* idle list (backends), wait queue (clients), dead list */
    int idle;                   /* a backend in the idle list */
    int waiting;                /* a client in the wait queue (not read until it gets a backend) */
    int blocked;                /* buf[sent:fwd] waits for the peer to become writable */
    int dead;
    int held;                   /* a client whose stop frame waits for its transaction's end (hold_stops) */
    int starting;               /* a client the relay accepted, before its startup packet was answered */
    int owned;                  /* accepted by the relay: closed by it at EOF or a hangup frame */
    int aged;                   /* starting at the last take_starting(aged_only=True) (relay logins) */
    int report;                 /* owned, known to the caller (kept at a keyed greeting): its close is a GONE event */
    unsigned long ticks;        /* a waiting client: age_waiting() calls since it began to wait */
    int pending_event;          /* to act on once buf[sent:fwd] is written */
    int pending_arg;
    long long outstanding;      /* clients: requests sent whose boundary has not come back */
    int last_status;            /* backends: the status of the last boundary walked (a handover mid-transaction) */
    int lazy;                   /* clients (pg_begin): TXW_BEGIN / TXW_START answered by the relay, not sent yet */
    int inject;                 /* clients: a Parse the relay put in front of a Bind is in flight (named_to_unnamed) */
    int swallow;                /* backends (pg_begin): messages of a BEGIN sent ahead still to drop (begin_ahead) */
    int zskip;                  /* backends: 2, the ReadyForQuery after the next one is the relay's Sync's (dropped) */
    int drop;                   /* backends (MySQL): the answer being walked is dropped (its BEGIN failed) */
    unsigned long long insert_id;   /* clients (MySQL): the last insert id other than 0 of an answer relayed to it */
    unsigned long long requests; /* clients: requests walked since the relay was given the client (activity) */
    uint32_t mask;              /* epoll events registered */
    WalkState st;
    size_t len, sent, fwd;      /* buf[0:sent] written, [sent:fwd] walked, [fwd:len] not walked yet */
    unsigned char *buf;         /* bufsize bytes while it holds any, else NULL: an idle connection holds none */
    Login *login;               /* a starting client in a SCRAM exchange, else NULL */
    unsigned char addr_len;     /* a client the relay accepted: its peer's address as accept4 gave it (IPv4, IPv6, */
    unsigned char addr[28];     /* an unnamed Unix socket; 0: none kept, getpeername asks) */
    unsigned char quiet;        /* kept at a keyed greeting with set_quiet(True), not reported to the caller yet */
    unsigned char key[8];       /* a quiet client's cancel key */
    int template_id;            /* a quiet client's greeting */
    double greeted_at;          /* a quiet client's greeting: seconds since the epoch (its QUIET event says when) */
    unsigned char watch_state;  /* a quiet client at the last age_quiet(): WATCH_IDLE, _BUSY or _TRANSACTION */
    unsigned long long watch_requests;  /* its requests walked then */
    double watch_since;         /* the age_quiet() `now` since which both are so (0: not seen yet) */
} Conn;

enum { WATCH_IDLE = 0, WATCH_BUSY = 1, WATCH_TRANSACTION = 2 };

#define MAX_SPARE_BUFFERS 64    /* buffers kept for reuse after idle connections gave theirs back */

typedef struct Event {
    struct Event *next;
    int kind, fd, peer_fd, arg;
    size_t len;
    unsigned char data[];
} Event;

typedef struct {
    PyObject_HEAD
    int epfd;
    int threaded;
    int eventfd;                /* threaded: readable when events wait for run_ready() */
    int wakefd;                 /* threaded: in the epoll set, written to stop the thread */
    int signaled, stopping, thread_started;
    int hold_stops;             /* a linked client's stop frame waits for the transaction's end, then it alone goes */
    int yielding;               /* set_yield(True): no backend is lent by the relay itself; free ones go idle */
    pthread_t thread;
    pthread_mutex_t lock;       /* threaded: held by whoever touches the relay's state */
    Rule rules[2];              /* by role: client -> backend, backend -> client */
    size_t bufsize;
    Conn **conns;               /* by fd */
    unsigned int *relayed_before;   /* by fd: requests walked for the client last forgotten there (relayed_before) */
    unsigned long long *insert_id_before;   /* by fd: that client's insert_id (MySQL; insert_id()) */
    int nconns;
    Conn *idle;                 /* LIFO */
    Conn *wait_head, *wait_tail;
    Conn *dead;
    Event *queue, **queue_tail; /* events not yet taken by the caller */
    Greeting *greetings;
    void *spare;                /* buffers given back, linked through their first bytes */
    int n_spare;
    unsigned char refuse[16], refusal[16];
    size_t refuse_len, refusal_len;
    unsigned char hangup[256];
    unsigned long long accepted, greeted;
    unsigned char *keys;        /* relay logins: 8-byte cancel keys the caller gave (add_keys), used from the end */
    size_t n_keys, keys_cap;
    long long login_budget;     /* relay logins: keyed greetings still allowed (-1: no limit) */
    int budget_gives_back;      /* a quiet client's goodbye adds one to it (a limit on clients, not a refusal) */
    unsigned long long logins;  /* relay logins: clients greeted with a key and handed over as GREETED */
    unsigned long long transactions, handed_over;
    int quiet_mode;             /* set_quiet(True): a kept greeting is not reported until needed (quiet clients) */
    unsigned long long quiet_greeted, quiet_gone;   /* since the last quiet_counts() */
    Py_ssize_t n_idle, n_waiting, n_linked_clients, n_conns, n_quiet;
    PyObject *wake_handler;     /* set_wake: what wake() calls when the caller's code is needed */
    unsigned long long attention_seen;  /* the module's attention count at the handler's last whole wake-up */
    int eager;                  /* set_wake_rules: the handler takes every wake-up whole */
    size_t keys_low;            /* set_wake_rules: fewer keys than this calls the handler */
} RelayObject;

/* attend(): bumped by the caller whenever what its whole wake-ups judge may have changed (see wake()). */
static unsigned long long attention = 1;

static int update_mask(RelayObject *r, Conn *c) {
    uint32_t mask = 0;
    if (!c->blocked && !c->waiting && !c->held)
        mask |= EPOLLIN;
    if (c->peer && c->peer->blocked)
        mask |= EPOLLOUT;
    if (mask == c->mask)
        return 0;
    struct epoll_event ev = {.events = mask, .data.fd = c->fd};
    c->mask = mask;
    return epoll_ctl(r->epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

/* c gets a buffer (a spare one if any); -1: out of memory. */
static int need_buf(RelayObject *r, Conn *c) {
    if (c->buf)
        return 0;
    if (r->spare) {
        c->buf = r->spare;
        memcpy(&r->spare, c->buf, sizeof(void *));
        r->n_spare--;
    } else {
        c->buf = PyMem_RawMalloc(r->bufsize);
        if (c->buf == NULL)
            return -1;
    }
    c->len = c->sent = c->fwd = 0;
    return 0;
}

/* c gives its buffer back when every byte in it was sent (idle connections hold none: an idle client costs the
   Conn alone). force: a connection being freed. */
static void drop_buf(RelayObject *r, Conn *c, int force) {
    if (c->buf == NULL || (!force && (c->sent != c->len || c->pending_event)))
        return;
    if (r->n_spare < MAX_SPARE_BUFFERS) {
        memcpy(c->buf, &r->spare, sizeof(void *));
        r->spare = c->buf;
        r->n_spare++;
    } else {
        PyMem_RawFree(c->buf);
    }
    c->buf = NULL;
    c->len = c->sent = c->fwd = 0;
}

static void report_quiet(RelayObject *r, Conn *c);

static void emit(RelayObject *r, int kind, Conn *c, int arg) {
    if (c->quiet)
        report_quiet(r, c);     /* the caller learns of a quiet client before any event of it */
    if (c->peer && c->peer->quiet)
        report_quiet(r, c->peer);
    size_t len = c->len - c->fwd;
    Event *ev = PyMem_RawMalloc(sizeof(Event) + len);
    if (ev == NULL)
        return;                 /* out of memory: the sockets stay forgotten; nothing better to do here */
    ev->next = NULL;
    ev->kind = kind;
    ev->fd = c->fd;
    ev->peer_fd = c->peer ? c->peer->fd : -1;
    ev->arg = arg;
    ev->len = len;
    if (len)
        memcpy(ev->data, c->buf + c->fwd, len);
    *r->queue_tail = ev;
    r->queue_tail = &ev->next;
}

static void unqueue(RelayObject *r, Conn *c) {
    if (c->idle) {
        Conn **pp = &r->idle;
        while (*pp && *pp != c)
            pp = &(*pp)->next;
        if (*pp)
            *pp = c->next;
        c->idle = 0;
        r->n_idle--;
    }
    if (c->waiting) {
        Conn **pp = &r->wait_head, *prev = NULL;
        while (*pp && *pp != c) {
            prev = *pp;
            pp = &(*pp)->next;
        }
        if (*pp)
            *pp = c->next;
        if (r->wait_tail == c)
            r->wait_tail = prev;
        c->waiting = 0;
        r->n_waiting--;
    }
    c->next = NULL;
}

/* Forget c (and not its peer): out of epoll (unless it is about to be closed, which takes it out), the queues and
   the fd table; freed at the end of the call. */
#define RELAYED_BITS 21     /* relayed_before[fd]: the requests (at most RELAYED_MAX), and the client's lazy above */
#define RELAYED_MAX ((1u << RELAYED_BITS) - 1)

static void forget_closing(RelayObject *r, Conn *c, int closing) {
    if (c->dead)
        return;
    unqueue(r, c);
    if (!closing)
        epoll_ctl(r->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    if (c->fd < r->nconns && r->conns[c->fd] == c) {
        r->conns[c->fd] = NULL;
        if (c->role == ROLE_CLIENT) {
            r->relayed_before[c->fd] = (c->requests > RELAYED_MAX ? RELAYED_MAX : (unsigned int)c->requests)
                                       | ((unsigned int)c->lazy << RELAYED_BITS);
            r->insert_id_before[c->fd] = c->insert_id;
        }
    }
    if (c->role == ROLE_CLIENT && c->peer)
        r->n_linked_clients--;
    c->dead = 1;
    c->next = r->dead;
    r->dead = c;
    r->n_conns--;
}

static void forget(RelayObject *r, Conn *c) {
    forget_closing(r, c, 0);
}

/* Hand c and its linked peer (mid-request) back to the caller as one event. */
static void hand_over(RelayObject *r, int kind, Conn *c, int arg) {
    emit(r, kind, c, arg);
    Conn *p = c->peer;
    forget(r, c);
    if (p) {
        forget(r, p);
        p->peer = NULL;
    }
    c->peer = NULL;
    r->handed_over++;
}

/* A client the relay accepted: close it here, with no event, or a GONE event if the caller knows of it (report). The
   relay holds its only descriptor, so the close takes it out of epoll. */
static void hang_up(RelayObject *r, Conn *c) {
    int fd = c->fd;
    if (c->quiet) {             /* never reported: counted, no event */
        c->quiet = 0;
        r->n_quiet--;
        r->quiet_gone++;
        if (r->login_budget >= 0 && r->budget_gives_back)
            r->login_budget++;  /* its room is free again (a budget of a limit on the clients, not a refusal) */
    } else if (c->report) {
        size_t len = c->len;
        c->len = c->fwd;            /* no data in the event */
        emit(r, EV_GONE, c, 0);
        c->len = len;
    }
    forget_closing(r, c, 1);
    close(fd);
}

static void free_dead(RelayObject *r) {
    while (r->dead) {
        Conn *c = r->dead;
        r->dead = c->next;
        drop_buf(r, c, 1);
        PyMem_RawFree(c->login);
        PyMem_RawFree(c->st.stmts);
        PyMem_RawFree(c);
    }
}

static int register_conn(RelayObject *r, Conn *c) {
    if (c->fd >= r->nconns) {
        int n = r->nconns ? r->nconns : 64;
        while (n <= c->fd)
            n *= 2;
        Conn **grown = PyMem_RawRealloc(r->conns, sizeof(Conn *) * (size_t)n);
        if (grown == NULL) {
            errno = ENOMEM;
            return -1;
        }
        memset(grown + r->nconns, 0, sizeof(Conn *) * (size_t)(n - r->nconns));
        r->conns = grown;
        unsigned int *relayed = PyMem_RawRealloc(r->relayed_before, sizeof(unsigned int) * (size_t)n);
        if (relayed == NULL) {
            errno = ENOMEM;
            return -1;          /* (conns grown already: nconns stays, the next call grows both again) */
        }
        memset(relayed + r->nconns, 0, sizeof(unsigned int) * (size_t)(n - r->nconns));
        r->relayed_before = relayed;
        unsigned long long *ids = PyMem_RawRealloc(r->insert_id_before, sizeof(unsigned long long) * (size_t)n);
        if (ids == NULL) {
            errno = ENOMEM;
            return -1;          /* (as above) */
        }
        memset(ids + r->nconns, 0, sizeof(unsigned long long) * (size_t)(n - r->nconns));
        r->insert_id_before = ids;
        r->nconns = n;
    }
    if (r->conns[c->fd] != NULL) {
        errno = EEXIST;
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = c->fd};
    if (epoll_ctl(r->epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0)
        return -1;
    c->mask = EPOLLIN;
    r->conns[c->fd] = c;
    r->n_conns++;
    return 0;
}

static void pump(RelayObject *r, Conn *c);
static int startup(RelayObject *r, Conn *c);
static int greet_with_key(RelayObject *r, Conn *c, const Greeting *g, size_t plen, const unsigned char *before,
                          size_t before_len);
static int scram_begin(RelayObject *r, Conn *c, const Greeting *g, size_t plen);
static void give_back_starting(RelayObject *r, Conn *c);
static int scram_step(RelayObject *r, Conn *c);

/* c is at EOF or broken: a client only the relay knows is closed here, anything else goes to the caller. */
static void closed(RelayObject *r, Conn *c, int err) {
    if (c->owned && c->peer == NULL)
        hang_up(r, c);
    else
        hand_over(r, EV_CLOSED, c, err);
}

/* ---------------------------------------------------------------- a BEGIN the relay answers (pg_begin)
 *
 * A client between transactions (no backend, nothing outstanding) that sends a lone BEGIN or START TRANSACTION gets
 * CommandComplete and ReadyForQuery 'T' from the relay and holds no backend (Conn.lazy); a COMMIT or ROLLBACK next
 * gets CommandComplete and ReadyForQuery 'I' the same way. Any other request takes a backend as usual, and
 * begin_ahead() puts the BEGIN in front of it as the Python path's LazyTransaction does: Parse, Bind and Execute of
 * the unnamed statement with no Sync of their own, so that if the BEGIN failed the server would skip the client's
 * request up to its Sync and the client would get the BEGIN's error as that request's answer. A simple Query gets a
 * Sync of the relay's behind it (the server skips a simple Query too after an extended-protocol error): its
 * ReadyForQuery counts as one more outstanding request and is dropped (zskip). The backend drops the BEGIN's
 * ParseComplete, BindComplete and CommandComplete (swallow), forwarding a notice or parameter report among them. A
 * request opening with anything but a Query or a Parse, or one the buffer has no room to precede, goes to the caller
 * as a stop frame, and so does a BEGIN while one is lazy or inside a transaction; lazy_begin(fd) tells the caller
 * that the client it took had a BEGIN answered and not sent. */

/* Sent ahead behind the Parse of the unnamed statement holding the BEGIN's text (pg_begin_ahead) */
static const unsigned char PG_BIND_EXECUTE[] =
    "B\0\0\0\x0c" "\0\0\0\0\0\0\0\0"     /* Bind: unnamed portal and statement, no formats, no parameters */
    "E\0\0\0\x09" "\0\0\0\0\0";          /* Execute: the unnamed portal, every row */
#define PG_BIND_EXECUTE_LEN (sizeof(PG_BIND_EXECUTE) - 1)
#define PG_BEGIN_AHEAD_MAX (5 + 1 + BEGIN_TEXT_MAX + 3 + PG_BIND_EXECUTE_LEN)
static const unsigned char PG_SYNC[] = "S\0\0\0\x04";
#define PG_SYNC_LEN 5
#define PG_READY_LEN 6          /* a ReadyForQuery: 'Z', length 5, the status */

static inline uint32_t be32(const unsigned char *p);
static inline void put_be32(unsigned char *p, uint32_t v);

/* MySQL (mysql_begin): the BEGIN sent ahead is a COM_QUERY of its own, pipelined in front of the client's command; the
   backend drops its OK (whose status flags tell the response walk that a transaction is open: `mtrans`). An ERR in
   its place is forwarded as the answer to the client's command, and the answer to that command is dropped (`drop`),
   as the Python path does (engines/mysql/relay.py). The relay answers a lone BEGIN [WORK] or START TRANSACTION with
   the rule's bytes (an OK packet with the lane's status flags), and no COMMIT or ROLLBACK. */
static const unsigned char MY_BEGIN_AHEAD[] = "\x06\0\0\0\x03" "BEGIN";
#define MY_BEGIN_AHEAD_LEN (sizeof(MY_BEGIN_AHEAD) - 1)

static inline size_t my_frame_size(const unsigned char *h) {
    return 4 + ((size_t)h[0] | ((size_t)h[1] << 8) | ((size_t)h[2] << 16));
}

/* The bytes pg_begin_ahead writes for transaction code `code`. */
static size_t pg_begin_ahead_len(int code) {
    char text[BEGIN_TEXT_MAX];
    return 5 + 1 + begin_text(code, text) + 3 + PG_BIND_EXECUTE_LEN;
}

/* Whether the request at c->buf[c->sent] can have the client's lazy BEGIN put in front of it (begin_ahead). */
static int begin_fits(RelayObject *r, Conn *c) {
    if (r->rules[ROLE_CLIENT].mysql_begin_len)
        return c->len + MY_BEGIN_AHEAD_LEN <= r->bufsize;   /* (any command the relay forwards) */
    unsigned char type = c->buf[c->sent];
    return (type == 'Q' || type == 'P') && c->len + pg_begin_ahead_len(c->lazy) + PG_SYNC_LEN <= r->bufsize;
}

/* Parse, Bind and Execute of the unnamed statement holding the BEGIN of transaction code `code`, with no Sync, into
   out (PG_BEGIN_AHEAD_MAX bytes): their length. */
static size_t pg_begin_ahead(int code, unsigned char *out) {
    size_t tl = begin_text(code, (char *)out + 6);
    out[0] = 'P';
    put_be32(out + 1, (uint32_t)(4 + 1 + tl + 3));
    out[5] = 0;                                 /* the unnamed statement */
    memset(out + 6 + tl, 0, 3);                 /* the text's NUL, no parameter types */
    memcpy(out + 6 + tl + 3, PG_BIND_EXECUTE, PG_BIND_EXECUTE_LEN);
    return 6 + tl + 3 + PG_BIND_EXECUTE_LEN;
}

/* bytes go into c's walked bytes at buf[at] (before fwd): forwarded with them (begin_fits made the room). */
static void insert_walked(Conn *c, size_t at, const unsigned char *bytes, size_t n) {
    memmove(c->buf + at + n, c->buf + at, c->len - at);
    memcpy(c->buf + at, bytes, n);
    c->len += n;
    c->fwd += n;
}

static void begin_ahead(RelayObject *r, Conn *c, Conn *b) {
    int code = c->lazy;
    c->lazy = c->st.lazy = 0;
    if (r->rules[ROLE_CLIENT].mysql_begin_len) {
        insert_walked(c, c->sent, MY_BEGIN_AHEAD, MY_BEGIN_AHEAD_LEN);
        b->swallow = 1;
        return;
    }
    if (c->buf[c->sent] == 'Q') {  /* (a screened Query: whole before fwd) */
        insert_walked(c, c->sent + 1 + (size_t)be32(c->buf + c->sent + 1), PG_SYNC, PG_SYNC_LEN);
        c->outstanding++;
        b->zskip = 2;
    }
    unsigned char ahead[PG_BEGIN_AHEAD_MAX];
    insert_walked(c, c->sent, ahead, pg_begin_ahead(code, ahead));
    b->swallow = 3;
}

/* CommandComplete with tag, then ReadyForQuery with status, into out: its length. */
static size_t pg_local_answer(unsigned char *out, const char *tag, unsigned char status) {
    size_t tl = strlen(tag) + 1;
    out[0] = 'C';
    put_be32(out + 1, (uint32_t)(4 + tl));
    memcpy(out + 5, tag, tl);
    unsigned char *z = out + 5 + tl;
    z[0] = 'Z';
    put_be32(z + 1, 5);
    z[5] = status;
    return 5 + tl + PG_READY_LEN;
}

/* The client's Query at c->buf[c->fwd] is the transaction word `word` (EV_LOCAL): 1 when the relay answered it (the
   Query is dropped), 0 when it did not (nothing written), -1 when the client was handed over (a partial write). */
static int answer_locally(RelayObject *r, Conn *c, int word) {
    const Rule *rule = &r->rules[ROLE_CLIENT];
    int begin = (word & TXW_WORD) == TXW_BEGIN || (word & TXW_WORD) == TXW_START;
    if (c->peer != NULL || c->outstanding != 0 || (begin ? c->lazy != 0 : c->lazy == 0))
        return 0;
    unsigned char answer[64];
    size_t n;
    if (rule->mysql_begin_len) {
        memcpy(answer, rule->mysql_begin, rule->mysql_begin_len);
        n = rule->mysql_begin_len;
    } else {
        int w = word & TXW_WORD;
        n = pg_local_answer(answer, w == TXW_BEGIN ? "BEGIN" : w == TXW_START ? "START TRANSACTION"
                                    : w == TXW_COMMIT ? "COMMIT" : "ROLLBACK", begin ? 'T' : 'I');
    }
    ssize_t w;
    do
        w = send(c->fd, answer, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    while (w < 0 && errno == EINTR);
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return 0;               /* its socket is full: answered the ordinary way */
    if (w != (ssize_t)n) {
        shutdown(c->fd, SHUT_RDWR);     /* an answer cut short: the client cannot be served on */
        closed(r, c, w < 0 ? errno : EPIPE);
        return -1;
    }
    c->fwd += rule->mysql_begin_len ? my_frame_size(c->buf + c->fwd) : 1 + (size_t)be32(c->buf + c->fwd + 1);
    c->sent = c->fwd;
    c->lazy = c->st.lazy = begin ? word : 0;
    c->requests++;
    return 1;
}

/* Whether the buffer has room for the batch at c->buf[c->fwd], which binds statement `index` of the client's table
   (EV_NAMED), made a batch of the unnamed statement, and for the client's lazy BEGIN in front of it. */
static int named_fits(RelayObject *r, Conn *c, int index) {
    const StatementTable *t = c->st.stmts;
    if (t == NULL || index < 0 || index >= t->n)
        return 0;
    size_t grows = 5 + t->s[index].parse_len - t->s[index].name_len;
    if (c->lazy)
        grows += pg_begin_ahead_len(c->lazy);
    return c->len + grows <= r->bufsize;
}

/* The batch at c->buf[c->fwd] opens with a Bind of statement `index` of the client's table (EV_NAMED; named_fits):
   Parse of its text as the unnamed statement goes in front, and the Bind binds the unnamed statement (see "named
   statements" above); its ParseComplete is dropped (inject). */
static void named_to_unnamed(Conn *c, int index) {
    const Statement *s = &c->st.stmts->s[index];
    size_t parse_total = 5 + s->parse_len;
    unsigned char *f = c->buf + c->fwd;     /* 'B', length, the unnamed portal's NUL, the name, its NUL, ... */
    size_t bind_total = 1 + (size_t)be32(f + 1);
    unsigned char *tail = f + 6 + s->name_len;
    memmove(f + parse_total + 6, tail, (size_t)(c->buf + c->len - tail));
    f[0] = 'P';
    put_be32(f + 1, (uint32_t)(4 + s->parse_len));
    memcpy(f + 5, s->parse, s->parse_len);
    unsigned char *b = f + parse_total;
    b[0] = 'B';
    put_be32(b + 1, (uint32_t)(bind_total - s->name_len - 1));
    b[5] = 0;                               /* the unnamed portal; the name's NUL (the unnamed statement) follows */
    c->len = c->len + parse_total - s->name_len;
    c->inject = 1;
}

static void link_pair(RelayObject *r, Conn *client, Conn *backend) {
    if (client->lazy)
        begin_ahead(r, client, backend);
    client->peer = backend;
    backend->peer = client;
    r->n_linked_clients++;
}

/* A backend is free: with `lend`, to the first waiting client (which then forwards what it holds), else (or
   with no client waiting) to the idle list. */
static void release_backend(RelayObject *r, Conn *b, int lend) {
    Conn *client = lend ? r->wait_head : NULL;
    if (client) {
        unqueue(r, client);
        link_pair(r, client, b);
        update_mask(r, client);
        update_mask(r, b);
        pump(r, client);
        return;
    }
    b->next = r->idle;
    r->idle = b;
    b->idle = 1;
    r->n_idle++;
}

/* A client with a request and no backend: linked to an idle one (1), or queued to wait for one (0). */
static int link_or_wait(RelayObject *r, Conn *c) {
    if (r->idle && !r->yielding) {
        Conn *b = r->idle;
        unqueue(r, b);
        link_pair(r, c, b);
        update_mask(r, b);
        return 1;
    }
    c->waiting = 1;
    c->ticks = 0;
    c->next = NULL;
    if (r->wait_tail)
        r->wait_tail->next = c;
    else
        r->wait_head = c;
    r->wait_tail = c;
    r->n_waiting++;
    update_mask(r, c);
    return 0;
}

/* Write, act on events and walk until c has nothing more to do now; may forget c. */
static void pump(RelayObject *r, Conn *c) {
    const Rule *rule = &r->rules[c->role];
    if (c->starting && (startup(r, c) < 0 || c->starting))
        return;             /* handed over, or its startup packet is not whole yet: nothing of it is walked */
    for (;;) {
        if (c->sent < c->fwd) {
            Conn *p = c->peer;
            ssize_t n = send(p->fd, c->buf + c->sent, c->fwd - c->sent, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK) {
                    c->blocked = 1;
                    update_mask(r, c);
                    update_mask(r, p);
                    return;
                }
                hand_over(r, EV_CLOSED, p, errno);     /* the peer is gone: both go back to the caller */
                return;
            }
            c->sent += (size_t)n;
            continue;
        }
        if (c->pending_event) {
            int event = c->pending_event, arg = c->pending_arg;
            c->pending_event = 0;
            if (event == EV_BOUNDARY) {
                Conn *client = c->peer;
                c->last_status = arg;
                if (client->outstanding > 0)
                    client->outstanding--;
                if (client->outstanding == 0 && arg != 'I' && client->held) {
                    /* Its transaction goes on and the stop frame waited for this answer: the client goes to the
                       caller with this backend (unless the backend said more than the answer: then the backend) */
                    client->held = 0;
                    if (c->len > c->fwd)
                        hand_over(r, EV_UNSOLICITED, c, -1);
                    else
                        pump(r, client);
                    return;
                }
                if (client->outstanding == 0 && arg == 'I') {
                    r->transactions++;
                    client->peer = NULL;
                    c->peer = NULL;
                    r->n_linked_clients--;
                    update_mask(r, client);
                    update_mask(r, c);
                    if (client->held) {             /* its stop frame goes to the caller now, without a backend */
                        client->held = 0;
                        pump(r, client);
                    } else if (client->len == client->fwd) {
                        drop_buf(r, client, 0);     /* it waits for its next request holding no buffer */
                    }
                    if (c->len > c->fwd) {          /* it spoke past the end of the transaction */
                        hand_over(r, EV_UNSOLICITED, c, -1);
                        return;
                    }
                    release_backend(r, c, !r->yielding);     /* yielding: idle, for the caller to take */
                    if (c->dead)
                        return;
                }
                continue;
            }
            if (event == EV_LOCAL) {
                int answered = answer_locally(r, c, arg);
                if (answered < 0)
                    return;
                if (answered)
                    continue;
                c->st.lazy = 0;     /* not answered: walked again as an ordinary Query (lazy: begin_ahead) */
                if ((arg & TXW_WORD) != TXW_BEGIN && (arg & TXW_WORD) != TXW_START)
                    continue;
                event = EV_HANDOVER;    /* a BEGIN the relay does not answer stops, as the screen would have it */
                arg = c->buf[c->fwd + rule->type_offset];
            }
            if (event == EV_NAMED) {
                if (c->outstanding == 0 && !c->inject && named_fits(r, c, arg)) {
                    /* rewritten once the client has its backend: until then its bytes are what it sent (a client
                       taken back while it waits goes with them) */
                    if (c->peer == NULL && !link_or_wait(r, c)) {
                        c->pending_event = EV_NAMED;
                        c->pending_arg = arg;
                        return;
                    }
                    named_to_unnamed(c, arg);
                    continue;           /* walked again: a batch of the unnamed statement now */
                }
                event = EV_HANDOVER;
                arg = c->buf[c->fwd + rule->type_offset];
            }
            if (event == EV_HANDOVER && c->owned && c->peer == NULL && r->hangup[arg]) {
                hang_up(r, c);
                return;
            }
            if (r->hold_stops && c->role == ROLE_CLIENT && c->peer &&
                (event == EV_HANDOVER || event == EV_MALFORMED)) {
                if (c->outstanding > 0) {
                    c->pending_event = event;       /* acted on at the backend's boundary that answers the last */
                    c->pending_arg = arg;
                    c->held = 1;
                    update_mask(r, c);
                    return;
                }
                arg = c->peer->last_status;         /* mid-transaction: it goes with its backend and that status */
            }
            hand_over(r, event, c, arg);
            return;
        }
        if (c->sent) {
            memmove(c->buf, c->buf + c->sent, c->len - c->sent);
            c->len -= c->sent;
            c->fwd -= c->sent;
            c->sent = 0;
        }
        if (c->fwd == c->len) {
            if (c->peer == NULL)
                drop_buf(r, c, 0);
            return;
        }
        if (c->swallow && c->st.remaining == 0 && rule->response == RESPONSE_MYSQL) {     /* (begin_ahead) */
            size_t avail = c->len - c->fwd;
            if (avail < 5)
                return;
            unsigned char *f = c->buf + c->fwd;
            size_t size = my_frame_size(f);
            if (size > r->bufsize || c->st.mstate != MY_START || c->st.mmore) {
                c->swallow = 0;     /* not an answer to a BEGIN: the walk judges it */
            } else if (avail < size) {
                return;
            } else if (f[4] == 0x00) {  /* its OK: dropped; its flags say the transaction is open */
                long status = mysql_ok_status(f + 4, size - 4);
                c->st.mtrans = status >= 0 && (status & MY_STATUS_IN_TRANS);
                memmove(f, f + size, avail - size);
                c->len -= size;
                c->swallow = 0;
                continue;
            } else if (f[4] == 0xFF) {  /* it failed: its ERR answers the client's command, whose answer goes */
                c->swallow = 0;
                c->drop = 1;
                c->fwd += size;
                continue;
            } else {
                c->swallow = 0;
            }
        }
        if (c->swallow && c->st.remaining == 0) {     /* the answer of a BEGIN sent ahead (begin_ahead) */
            size_t avail = c->len - c->fwd;
            if (avail < 5)
                return;
            unsigned char *f = c->buf + c->fwd;
            size_t size = 1 + (size_t)be32(f + 1);
            if (size < 5 || size > r->bufsize || !(f[0] == '1' || f[0] == '2' || f[0] == 'C' || f[0] == 'E' ||
                                                   f[0] == 'N' || f[0] == 'S')) {
                c->swallow = 0;     /* not an answer to a BEGIN: the walk judges it */
            } else if (avail < size) {
                return;
            } else if (f[0] == 'N' || f[0] == 'S') {
                c->fwd += size;     /* a notice or a parameter report: forwarded */
                continue;
            } else if (f[0] == 'E') {
                /* the BEGIN failed: the server skips the client's request up to the Sync, whose ReadyForQuery
                   (the relay's, after a simple Query) answers it */
                c->swallow = 0;
                if (c->zskip) {
                    c->zskip = 0;
                    if (c->peer && c->peer->outstanding > 0)
                        c->peer->outstanding--;
                }
            } else {
                memmove(f, f + size, avail - size);
                c->len -= size;
                c->swallow--;
                continue;
            }
        }
        if (c->role == ROLE_BACKEND && c->peer && c->peer->inject && c->st.remaining == 0) {
            /* the answer to a Parse the relay put in front of a named statement's Bind (named_to_unnamed) */
            size_t avail = c->len - c->fwd;
            if (avail < 5)
                return;
            unsigned char *f = c->buf + c->fwd;
            size_t size = 1 + (size_t)be32(f + 1);
            if (f[0] == '1' && size == 5) {             /* its ParseComplete: dropped */
                memmove(f, f + 5, avail - 5);
                c->len -= 5;
                c->peer->inject = 0;
                continue;
            }
            if ((f[0] == 'N' || f[0] == 'S' || f[0] == 'A') && size >= 5 && size <= r->bufsize) {
                if (avail < size)
                    return;
                c->fwd += size;     /* a notice, a parameter report or a notification: forwarded */
                continue;
            }
            c->peer->inject = 0;    /* anything else (its error): no ParseComplete comes */
        }
        WalkResult res = walk(rule, &c->st, c->buf + c->fwd, c->len - c->fwd);
        unsigned long long counted = 0;
        if (c->role == ROLE_CLIENT) {
            counted = c->st.counted;
            c->outstanding += (long long)counted;
            c->requests += counted;
            c->st.counted = 0;
        }
        if (res.consumed == 0 && res.event == EV_NONE)
            return;                                     /* an incomplete header: wait for more */
        if (c->st.insert_id) {      /* (MySQL) an OK's last insert id: the client's, unless its answer is dropped */
            if (c->peer && !c->drop)
                c->peer->insert_id = c->st.insert_id;
            c->st.insert_id = 0;
        }
        if (c->drop) {              /* the answer to a command behind a failed BEGIN (MySQL): walked, not forwarded */
            memmove(c->buf + c->fwd, c->buf + c->fwd + res.consumed, c->len - c->fwd - res.consumed);
            c->len -= res.consumed;
            res.consumed = 0;
            if (res.event == EV_BOUNDARY)
                c->drop = 0;
        }
        if (res.event == EV_BOUNDARY && c->zskip) {
            if (c->zskip == 2) {
                c->zskip = 1;       /* the client's request's own: forwarded */
            } else {                /* the relay's Sync's: counted as an answer, not forwarded */
                unsigned char *z = c->buf + c->fwd + res.consumed - PG_READY_LEN;
                c->zskip = 0;
                if (res.consumed >= PG_READY_LEN && z[0] == 'Z' && be32(z + 1) == 5) {
                    memmove(z, z + PG_READY_LEN, c->len - (c->fwd + res.consumed));
                    c->len -= PG_READY_LEN;
                    res.consumed -= PG_READY_LEN;
                }
            }
        }
        c->fwd += res.consumed;
        c->pending_event = res.event;
        c->pending_arg = res.arg;
        if (c->sent < c->fwd && c->peer == NULL) {
            if (c->role == ROLE_BACKEND) {              /* an idle backend spoke: the caller decides */
                c->fwd = c->sent;
                c->pending_event = 0;
                hand_over(r, EV_UNSOLICITED, c, -1);
                return;
            }
            if (c->lazy && !begin_fits(r, c)) {         /* the caller sends its BEGIN with the request */
                c->outstanding = 0;
                c->requests -= counted;
                c->fwd = c->sent;
                c->pending_event = 0;
                hand_over(r, EV_HANDOVER, c, c->buf[c->sent]);
                return;
            }
            if (!link_or_wait(r, c))
                return;
        }
    }
}

static void on_readable(RelayObject *r, Conn *c) {
    if (need_buf(r, c) < 0) {
        closed(r, c, ENOMEM);
        return;
    }
    if (c->len >= r->bufsize)
        return;
    ssize_t n = recv(c->fd, c->buf + c->len, r->bufsize - c->len, MSG_DONTWAIT);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return;
        closed(r, c, errno);
        return;
    }
    if (n == 0) {
        closed(r, c, 0);
        return;
    }
    c->len += (size_t)n;
    pump(r, c);
}

static int send_all_now(int fd, const unsigned char *data, size_t len) {
    while (len) {
        ssize_t n = send(fd, data, len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

/* A client's first packets: answer the TLS request and a startup packet greeted before; else the engine's. */
static int startup(RelayObject *r, Conn *c) {
    while (c->starting) {
        if (c->login)
            return scram_step(r, c);
        if (c->len < 4)
            return 0;
        size_t plen = ((size_t)c->buf[0] << 24) | ((size_t)c->buf[1] << 16) | ((size_t)c->buf[2] << 8) | c->buf[3];
        if (plen < 8 || plen > MAX_STARTUP) {
            hand_over(r, EV_MALFORMED, c, -1);
            return -1;
        }
        if (c->len < plen)
            return 0;
        const unsigned char *reply = NULL;
        size_t reply_len = 0;
        int greeted = 0;
        if (plen == r->refuse_len && memcmp(c->buf, r->refuse, plen) == 0) {
            reply = r->refusal;
            reply_len = r->refusal_len;
        } else {
            Greeting *g = r->greetings;
            while (g && !(g->startup_len == plen && memcmp(g->startup, c->buf, plen) == 0))
                g = g->next;
            if (g == NULL) {
                hand_over(r, EV_STARTUP, c, 0);
                return -1;
            }
            if (g->key_at >= 0)
                return g->scram ? scram_begin(r, c, g, plen) : greet_with_key(r, c, g, plen, NULL, 0);
            reply = g->reply;
            reply_len = g->reply_len;
            greeted = 1;
        }
        if (send_all_now(c->fd, reply, reply_len) < 0) {     /* a fresh socket's send buffer is empty */
            hand_over(r, EV_CLOSED, c, errno);
            return -1;
        }
        memmove(c->buf, c->buf + plen, c->len - plen);
        c->len -= plen;
        if (greeted) {
            c->starting = 0;
            r->greeted++;
        }
    }
    return 0;
}

static Conn *alloc_conn(RelayObject *r, int fd, int role) {
    Conn *c = PyMem_RawMalloc(sizeof(Conn));      /* its buffer comes with its first bytes (need_buf) */
    if (c)
        memset(c, 0, sizeof(Conn));
    if (c) {
        c->fd = fd;
        c->role = role;
        c->last_status = 'I';
    }
    return c;
}

static void on_acceptable(RelayObject *r, Conn *listener) {
    for (int i = 0; i < 64; i++) {
        struct sockaddr_storage addr;
        socklen_t addr_len = sizeof(addr);
        int fd = accept4(listener->fd, (struct sockaddr *)&addr, &addr_len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return;             /* EAGAIN, or a client gone before it was accepted: the next wake-up retries */
        Conn *c = alloc_conn(r, fd, ROLE_CLIENT);
        if (c == NULL || register_conn(r, c) < 0) {
            PyMem_RawFree(c);
            close(fd);
            continue;
        }
        if (addr_len <= sizeof(c->addr)) {     /* kept for a relay login's GREETED event: no getpeername then */
            memcpy(c->addr, &addr, addr_len);
            c->addr_len = (unsigned char)addr_len;
        }
        c->owned = c->starting = 1;
        r->accepted++;
    }
}

/* threaded: the relay's state is the thread's while it serves; the caller takes the lock without the GIL. */
static void lock_relay(RelayObject *r) {
    if (!r->threaded)
        return;
    if (pthread_mutex_trylock(&r->lock) == 0)
        return;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&r->lock);
    Py_END_ALLOW_THREADS
}

static void unlock_relay(RelayObject *r) {
    if (r->threaded)
        pthread_mutex_unlock(&r->lock);
}

/* The queued events as a list of (kind, fd, peer_fd, unforwarded bytes, arg); called with the lock held. */
static PyObject *take_events(RelayObject *r) {
    free_dead(r);
    Event *ev = r->queue;
    r->queue = NULL;
    r->queue_tail = &r->queue;
    PyObject *list = PyList_New(0);
    while (ev) {
        Event *next = ev->next;
        if (list) {
            PyObject *item = Py_BuildValue("(iiiy#i)", ev->kind, ev->fd, ev->peer_fd, (const char *)ev->data,
                                           (Py_ssize_t)ev->len, ev->arg);
            if (item == NULL || PyList_Append(list, item) < 0)
                Py_CLEAR(list);
            Py_XDECREF(item);
        }
        PyMem_RawFree(ev);
        ev = next;
    }
    return list;
}

static void dispatch(RelayObject *self, struct epoll_event *evs, int n) {
    for (int i = 0; i < n; i++) {
        int fd = evs[i].data.fd;
        uint32_t what = evs[i].events;
        Conn *c = fd >= 0 && fd < self->nconns ? self->conns[fd] : NULL;     /* -1: the wake fd */
        if (c == NULL)
            continue;
        if (c->role == ROLE_LISTENER) {
            on_acceptable(self, c);
            continue;
        }
        if (what & EPOLLOUT) {
            Conn *src = c->peer;
            if (src && src->blocked) {
                src->blocked = 0;
                update_mask(self, c);
                update_mask(self, src);
                pump(self, src);
                if (fd >= self->nconns || self->conns[fd] != c)
                    continue;
            }
        }
        if (what & (EPOLLERR | EPOLLHUP) && !(what & EPOLLIN)) {
            closed(self, c, 0);
            continue;
        }
        if (what & EPOLLIN && !c->blocked && !c->waiting && !c->held)
            on_readable(self, c);
        else if (what & (EPOLLERR | EPOLLHUP) && c->waiting)
            closed(self, c, 0);
    }
}

#define THREAD_BATCH 256

static void *serve_thread(void *arg) {
    RelayObject *r = arg;
    struct epoll_event evs[THREAD_BATCH];
    for (;;) {
        int n = epoll_wait(r->epfd, evs, THREAD_BATCH, -1);
        if (n < 0 && errno != EINTR)
            break;
        pthread_mutex_lock(&r->lock);
        if (r->stopping) {
            pthread_mutex_unlock(&r->lock);
            break;
        }
        if (n > 0)
            dispatch(r, evs, n);
        free_dead(r);
        if (r->queue && !r->signaled) {
            uint64_t one = 1;
            if (write(r->eventfd, &one, sizeof(one)) == sizeof(one))
                r->signaled = 1;
        }
        pthread_mutex_unlock(&r->lock);
    }
    return NULL;
}

static PyObject *Relay_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    RelayObject *self = (RelayObject *)type->tp_alloc(type, 0);
    if (self) {
        self->epfd = self->eventfd = self->wakefd = -1;
        self->queue_tail = &self->queue;
        self->login_budget = -1;
        pthread_mutex_init(&self->lock, NULL);
    }
    return (PyObject *)self;
}

static int Relay_init(RelayObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"client", "server", "buffer_size", "threaded", "hold_stops", NULL};
    PyObject *client, *server;
    Py_ssize_t bufsize = 16384;
    int threaded = 0, hold_stops = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!|npp", kwlist, &WalkerType, &client, &WalkerType, &server,
                                     &bufsize, &threaded, &hold_stops))
        return -1;
    self->hold_stops = hold_stops;
    if (self->epfd >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "Relay.__init__ called twice");
        return -1;
    }
    self->rules[ROLE_CLIENT] = ((WalkerObject *)client)->rule;
    self->rules[ROLE_BACKEND] = ((WalkerObject *)server)->rule;
    for (int i = 0; i < 2; i++) {
        Rule *rule = &self->rules[i];
        Py_ssize_t need = (Py_ssize_t)rule->header_size + rule->type_offset + 2;
        if ((rule->boundary >= 0 || rule->response) && rule->max_boundary + 1 > need)
            need = rule->max_boundary + 1;
        int screens = 0;
        for (int t = 0; t < 256; t++)
            screens |= rule->screen[t];
        if ((screens || rule->pg_unnamed) && rule->max_screen + 1 > need)
            need = (Py_ssize_t)rule->max_screen + 1;
        if (bufsize < 2 * need) {
            PyErr_SetString(PyExc_ValueError, "buffer_size too small for the framing rules");
            return -1;
        }
    }
    self->bufsize = (size_t)bufsize;
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (self->epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (threaded) {
        self->eventfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        self->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = -1};
        if (self->eventfd < 0 || self->wakefd < 0 || epoll_ctl(self->epfd, EPOLL_CTL_ADD, self->wakefd, &ev) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        self->threaded = 1;
        int err = pthread_create(&self->thread, NULL, serve_thread, self);
        if (err) {
            self->threaded = 0;
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        self->thread_started = 1;
    }
    return 0;
}

static Conn *new_conn(RelayObject *r, int fd, int role, PyObject *data) {
    Py_buffer view = {0};
    if (data && PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if ((size_t)view.len > r->bufsize) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "data larger than the relay's buffer");
        return NULL;
    }
    Conn *c = alloc_conn(r, fd, role);
    if (c == NULL) {
        if (data)
            PyBuffer_Release(&view);
        PyErr_NoMemory();
        return NULL;
    }
    if (data) {
        if (view.len && need_buf(r, c) < 0) {
            PyBuffer_Release(&view);
            PyMem_RawFree(c);
            PyErr_NoMemory();
            return NULL;
        }
        if (view.len)
            memcpy(c->buf, view.buf, (size_t)view.len);
        c->len = (size_t)view.len;
        PyBuffer_Release(&view);
    }
    if (register_conn(r, c) < 0) {
        if (errno == EEXIST)
            PyErr_Format(PyExc_ValueError, "fd %d is already in the relay", fd);
        else
            PyErr_SetFromErrno(PyExc_OSError);
        drop_buf(r, c, 1);
        PyMem_RawFree(c);
        return NULL;
    }
    return c;
}

static PyObject *add_conn(RelayObject *self, PyObject *args, int role) {
    int fd;
    PyObject *data = NULL;
    if (!PyArg_ParseTuple(args, role == ROLE_CLIENT ? "i|O" : "i", &fd, &data))
        return NULL;
    if (self->epfd < 0)
        return PyErr_Format(PyExc_ValueError, "relay is closed");
    if (fd < 0)
        return PyErr_Format(PyExc_ValueError, "bad file descriptor %d", fd);
    lock_relay(self);
    Conn *c = new_conn(self, fd, role, data);
    PyObject *events = NULL;
    if (c != NULL) {
        if (role == ROLE_CLIENT)
            pump(self, c);
        else if (role == ROLE_BACKEND)
            release_backend(self, c, 1);
        events = take_events(self);
    }
    unlock_relay(self);
    return events;
}

static PyObject *Relay_add_client(RelayObject *self, PyObject *args) {
    return add_conn(self, args, ROLE_CLIENT);
}

static PyObject *Relay_add_backend(RelayObject *self, PyObject *args) {
    return add_conn(self, args, ROLE_BACKEND);
}

static int copy_small(PyObject *obj, unsigned char *to, size_t *len, size_t cap, const char *what) {
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0)
        return -1;
    if ((size_t)view.len > cap) {
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_ValueError, "%s: at most %zu bytes", what, cap);
        return -1;
    }
    memcpy(to, view.buf, (size_t)view.len);
    *len = (size_t)view.len;
    PyBuffer_Release(&view);
    return 0;
}

static PyObject *Relay_listen(RelayObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"fd", "refuse", "refusal", "hangup", NULL};
    int fd;
    PyObject *refuse = NULL, *refusal = NULL, *hangup = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i|OOO", kwlist, &fd, &refuse, &refusal, &hangup))
        return NULL;
    if (self->epfd < 0)
        return PyErr_Format(PyExc_ValueError, "relay is closed");
    unsigned char refuse_buf[16], refusal_buf[16], hangup_set[256] = {0};
    size_t refuse_len = 0, refusal_len = 0;
    if ((refuse && copy_small(refuse, refuse_buf, &refuse_len, sizeof(refuse_buf), "refuse") < 0) ||
        (refusal && copy_small(refusal, refusal_buf, &refusal_len, sizeof(refusal_buf), "refusal") < 0) ||
        set_from_bytes(hangup, hangup_set, "hangup") < 0)
        return NULL;
    lock_relay(self);
    memcpy(self->refuse, refuse_buf, refuse_len);
    self->refuse_len = refuse_len;
    memcpy(self->refusal, refusal_buf, refusal_len);
    self->refusal_len = refusal_len;
    memcpy(self->hangup, hangup_set, sizeof(hangup_set));
    Conn *c = new_conn(self, fd, ROLE_LISTENER, NULL);
    PyObject *events = c ? take_events(self) : NULL;
    unlock_relay(self);
    return events;
}

static PyObject *Relay_cache_greeting(RelayObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"startup", "reply", "key_at", "template", "keep", "scram", NULL};
    Py_buffer startup, reply, tail = {0}, stored = {0}, server = {0};
    long key_at = -1;
    int template_id = 0, keep = 0;
    PyObject *scram = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*y*|lipO", kwlist, &startup, &reply, &key_at, &template_id, &keep,
                                     &scram))
        return NULL;
    const char *bad = NULL;
    if (key_at < -1 || (key_at >= 0 && (size_t)key_at + 8 > (size_t)reply.len))
        bad = "key_at: -1, or where 8 bytes of the reply start";
    else if (scram != Py_None && (key_at < 0 || !PyArg_ParseTuple(scram, "y*y*y*", &tail, &stored, &server)))
        bad = "scram: (tail, stored_key, server_key) of a keyed greeting";
    else if (scram != Py_None && (tail.len > SCRAM_TAIL_MAX || stored.len != 32 || server.len != 32))
        bad = "scram: a tail of at most 160 bytes, keys of 32 bytes";
    Greeting *g = bad ? NULL : PyMem_RawMalloc(sizeof(Greeting) + (size_t)startup.len + (size_t)reply.len);
    if (g != NULL) {
        g->startup_len = (size_t)startup.len;
        g->reply_len = (size_t)reply.len;
        g->key_at = key_at;
        g->template_id = template_id;
        g->keep = keep;
        g->scram = scram != Py_None;
        g->tail_len = 0;
        if (g->scram) {
            memcpy(g->tail, tail.buf, (size_t)tail.len);
            g->tail_len = (size_t)tail.len;
            memcpy(g->stored_key, stored.buf, 32);
            memcpy(g->server_key, server.buf, 32);
        }
        g->reply = g->startup + startup.len;
        memcpy(g->startup, startup.buf, (size_t)startup.len);
        memcpy(g->reply, reply.buf, (size_t)reply.len);
    }
    Py_buffer *held[] = {&startup, &reply, &tail, &stored, &server};
    for (size_t i = 0; i < sizeof(held) / sizeof(held[0]); i++)
        if (held[i]->obj)
            PyBuffer_Release(held[i]);
    if (bad) {
        PyErr_Clear();
        return PyErr_Format(PyExc_ValueError, "%s", bad);
    }
    if (g == NULL)
        return PyErr_NoMemory();
    lock_relay(self);
    g->next = self->greetings;
    self->greetings = g;
    unlock_relay(self);
    Py_RETURN_NONE;
}

#ifndef RUN_ROUNDS
#define RUN_ROUNDS 8
#endif
#ifndef RUN_MORE_AFTER
#define RUN_MORE_AFTER 1
#endif

static PyObject *serve_ready(RelayObject *self, int max_events);

static PyObject *Relay_run_ready(RelayObject *self, PyObject *args) {
    int max_events = 256;
    if (!PyArg_ParseTuple(args, "|i", &max_events))
        return NULL;
    return serve_ready(self, max_events);
}

static PyObject *serve_ready(RelayObject *self, int max_events) {
    if (self->epfd < 0)
        return PyErr_Format(PyExc_ValueError, "relay is closed");
    if (self->threaded) {
        uint64_t count;
        lock_relay(self);
        if (read(self->eventfd, &count, sizeof(count)) < 0 && errno != EAGAIN)
            PyErr_SetFromErrno(PyExc_OSError);
        self->signaled = 0;
        PyObject *events = PyErr_Occurred() ? NULL : take_events(self);
        unlock_relay(self);
        return events;
    }
    if (max_events < 1 || max_events > 4096)
        max_events = 256;
    struct epoll_event evs[max_events];
    /* What became ready while a batch was served is served in the same call (a few rounds at most, so that the rest
       of the event loop is not kept waiting): one wake-up of the caller's loop then covers more of the load. */
    for (int round = 0; round < RUN_ROUNDS; round++) {
        int n = epoll_wait(self->epfd, evs, max_events, 0);
        if (n < 0) {
            if (errno == EINTR)
                break;
            if (round == 0)
                return PyErr_SetFromErrno(PyExc_OSError);
            break;
        }
        if (n == 0)
            break;
        dispatch(self, evs, n);
        if (n < RUN_MORE_AFTER)
            break;              /* one socket at a time: no load to catch up with (a lone client's round trip) */
    }
    return take_events(self);
}

/* ---------------------------------------------------------------- Wake-ups with no Python
 *
 * The caller's event loop calls wake() when fileno() is readable. A whole wake-up is the handler's, called with None:
 * it prepares what it must and calls run_ready() itself; wake() makes one when the handler asked for every wake-up
 * (set_wake_rules eager), when attend() was called since the last whole one, while the login budget is spent (0: the
 * handler judges it again; a quiet client's goodbye gives one back, see hang_up), or for a threaded relay. Otherwise
 * wake() serves the ready sockets itself and calls the handler, with the events, only when there are events, clients
 * waiting for a backend, or fewer keys than keys_low; a wake-up with none of those runs no Python at all.
 */

static PyObject *call_wake_handler(RelayObject *self, PyObject *arg) {
    PyObject *handler = self->wake_handler;
    Py_INCREF(handler);     /* (the handler may set another one) */
    PyObject *result = PyObject_CallOneArg(handler, arg);
    Py_DECREF(handler);
    return result;
}

static PyObject *Relay_wake(RelayObject *self, PyObject *unused) {
    if (self->wake_handler == NULL)
        return PyErr_Format(PyExc_ValueError, "wake: no handler (set_wake)");
    if (self->epfd < 0)
        Py_RETURN_NONE;     /* closed: nothing to serve */
    if (self->threaded || self->eager || self->attention_seen != attention || self->login_budget == 0) {
        unsigned long long seen = attention;    /* (an attend() while the handler runs makes the next one whole too) */
        PyObject *result = call_wake_handler(self, Py_None);
        if (result != NULL)
            self->attention_seen = seen;        /* a handler that failed gets a whole wake-up again */
        return result;
    }
    PyObject *events = serve_ready(self, 256);
    if (events == NULL)
        return NULL;
    if (PyList_GET_SIZE(events) == 0 && self->n_waiting == 0 && self->n_keys >= self->keys_low) {
        Py_DECREF(events);
        Py_RETURN_NONE;
    }
    PyObject *result = call_wake_handler(self, events);
    Py_DECREF(events);
    return result;
}

static PyObject *Relay_set_wake(RelayObject *self, PyObject *handler) {
    if (handler != Py_None && !PyCallable_Check(handler))
        return PyErr_Format(PyExc_TypeError, "set_wake: a callable or None");
    PyObject *old = self->wake_handler;
    self->wake_handler = handler == Py_None ? NULL : Py_NewRef(handler);
    self->attention_seen = 0;   /* the first wake-up is whole */
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

static PyObject *Relay_set_wake_rules(RelayObject *self, PyObject *args) {
    int eager;
    Py_ssize_t keys_low = 0;
    if (!PyArg_ParseTuple(args, "p|n", &eager, &keys_low))
        return NULL;
    if (keys_low < 0)
        return PyErr_Format(PyExc_ValueError, "set_wake_rules: keys_low of 0 or more");
    self->eager = eager;
    self->keys_low = (size_t)keys_low;
    Py_RETURN_NONE;
}

static PyObject *relay_attend(PyObject *module, PyObject *unused) {
    attention++;
    Py_RETURN_NONE;
}

static PyObject *Relay_fileno(RelayObject *self, PyObject *unused) {
    return PyLong_FromLong(self->threaded ? self->eventfd : self->epfd);
}

static void relay_clear(RelayObject *self) {
    if (self->thread_started) {
        lock_relay(self);
        self->stopping = 1;
        uint64_t one = 1;
        if (write(self->wakefd, &one, sizeof(one)) < 0)
            perror("multiproxy._relay: waking the relay thread");
        unlock_relay(self);
        Py_BEGIN_ALLOW_THREADS
        pthread_join(self->thread, NULL);
        Py_END_ALLOW_THREADS
        self->thread_started = 0;
    }
    self->threaded = 0;
    for (int fd = 0; fd < self->nconns; fd++) {
        Conn *c = self->conns[fd];
        if (c && c->owned && (!c->report || c->quiet))
            hang_up(self, c);       /* accepted by the relay, unknown to the caller: nobody else can close it */
        else if (c)
            forget(self, c);
    }
    free_dead(self);
    while (self->queue) {
        Event *next = self->queue->next;
        PyMem_RawFree(self->queue);
        self->queue = next;
    }
    self->queue_tail = &self->queue;
    while (self->greetings) {
        Greeting *next = self->greetings->next;
        PyMem_RawFree(self->greetings);
        self->greetings = next;
    }
    PyMem_RawFree(self->keys);
    self->keys = NULL;
    self->n_keys = self->keys_cap = 0;
    while (self->spare) {
        void *next;
        memcpy(&next, self->spare, sizeof(void *));
        PyMem_RawFree(self->spare);
        self->spare = next;
    }
    self->n_spare = 0;
    PyMem_RawFree(self->conns);
    self->conns = NULL;
    PyMem_RawFree(self->relayed_before);
    self->relayed_before = NULL;
    PyMem_RawFree(self->insert_id_before);
    self->insert_id_before = NULL;
    self->nconns = 0;
    self->idle = self->wait_head = self->wait_tail = NULL;
    int *own[] = {&self->epfd, &self->eventfd, &self->wakefd};
    for (size_t i = 0; i < sizeof(own) / sizeof(own[0]); i++) {
        if (*own[i] >= 0)
            close(*own[i]);
        *own[i] = -1;
    }
}

static PyObject *Relay_close(RelayObject *self, PyObject *unused) {
    relay_clear(self);
    Py_RETURN_NONE;
}

static PyObject *Relay_stats(RelayObject *self, PyObject *unused) {
    lock_relay(self);
    PyObject *stats = Py_BuildValue("{s:n,s:n,s:n,s:n,s:K,s:K,s:K,s:K,s:K,s:n,s:n}", "connections", self->n_conns,
                                    "idle", self->n_idle, "waiting", self->n_waiting,
                                    "linked", self->n_linked_clients, "transactions", self->transactions,
                                    "handed_over", self->handed_over, "accepted", self->accepted,
                                    "greeted", self->greeted, "logins", self->logins,
                                    "keys", (Py_ssize_t)self->n_keys, "quiet", self->n_quiet);
    unlock_relay(self);
    return stats;
}

static PyObject *Relay_take_idle(RelayObject *self, PyObject *unused) {
    if (self->epfd < 0)
        return PyErr_Format(PyExc_ValueError, "relay is closed");
    lock_relay(self);
    int fd = -1;
    Conn *b = self->idle;
    if (b) {
        fd = b->fd;
        forget(self, b);
        free_dead(self);
    }
    unlock_relay(self);
    return PyLong_FromLong(fd);
}

static PyObject *Relay_disown(RelayObject *self, PyObject *args) {
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    lock_relay(self);
    Conn *c = self->epfd >= 0 && fd >= 0 && fd < self->nconns ? self->conns[fd] : NULL;
    int known = c != NULL && c->role == ROLE_CLIENT && c->report;
    if (known)
        c->owned = c->report = 0;
    unlock_relay(self);
    return PyBool_FromLong(known);
}

static PyObject *Relay_remove(RelayObject *self, PyObject *args) {
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    if (self->epfd < 0)
        return PyErr_Format(PyExc_ValueError, "relay is closed");
    lock_relay(self);
    Conn *c = fd >= 0 && fd < self->nconns ? self->conns[fd] : NULL;
    PyObject *result;
    if (c == NULL || c->peer || c->role == ROLE_LISTENER || c->starting || c->held) {
        result = Py_None;
        Py_INCREF(result);
    } else {
        result = PyBytes_FromStringAndSize(c->buf ? (const char *)c->buf + c->sent : "",
                                           (Py_ssize_t)(c->len - c->sent));
        if (result) {
            forget(self, c);
            free_dead(self);
        }
    }
    unlock_relay(self);
    return result;
}

static PyObject *Relay_take_waiting(RelayObject *self, PyObject *unused) {
    if (self->epfd < 0)
        return PyErr_Format(PyExc_ValueError, "relay is closed");
    lock_relay(self);
    Conn *c = self->wait_head;
    PyObject *result;
    if (c == NULL) {
        result = Py_None;
        Py_INCREF(result);
    } else {
        result = Py_BuildValue("(iy#)", c->fd, c->buf ? (const char *)c->buf + c->sent : "",
                               (Py_ssize_t)(c->len - c->sent));
        if (result) {
            forget(self, c);
            free_dead(self);
        }
    }
    unlock_relay(self);
    return result;
}

/* set_yield(on) -> events. While on, the relay lends no backend by itself: a backend that ends a transaction goes to
   the idle list and a client that starts a request waits, so that the caller decides where each free backend goes
   (take_idle; add_backend still lends to the client waiting longest). Turned off: the idle backends are lent to the
   waiting clients, longest waiting first, as if they had just come free. */
static PyObject *Relay_set_yield(RelayObject *self, PyObject *arg) {
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    if (self->epfd < 0)
        return PyErr_Format(PyExc_ValueError, "relay is closed");
    lock_relay(self);
    self->yielding = on;
    while (!on && self->idle && self->wait_head) {
        Conn *b = self->idle;
        unqueue(self, b);
        release_backend(self, b, 1);
    }
    PyObject *events = take_events(self);
    unlock_relay(self);
    return events;
}

/* age_waiting(limit) -> [(fd, bytes)]: one more tick for every client waiting for a backend (its ticks start at 0
   when it begins to wait); those whose ticks reach `limit` are forgotten and given back, longest waiting first, with
   their bytes not sent. The caller calls it at a steady pace to give up on clients that waited too long. */
static PyObject *Relay_age_waiting(RelayObject *self, PyObject *arg) {
    long limit = PyLong_AsLong(arg);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    if (self->epfd < 0)
        return PyErr_Format(PyExc_ValueError, "relay is closed");
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    lock_relay(self);
    for (Conn *c = self->wait_head; c; c = c->next)
        c->ticks++;
    /* The queue is in the order clients began to wait, so the aged ones are its head. */
    while (self->wait_head && (long)self->wait_head->ticks >= limit) {
        Conn *c = self->wait_head;
        PyObject *item = Py_BuildValue("(iy#)", c->fd, c->buf ? (const char *)c->buf + c->sent : "",
                                       (Py_ssize_t)(c->len - c->sent));
        if (item == NULL || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            Py_CLEAR(list);
            break;
        }
        Py_DECREF(item);
        forget(self, c);
    }
    free_dead(self);
    unlock_relay(self);
    return list;
}

static PyObject *Relay_peer(RelayObject *self, PyObject *args) {
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    lock_relay(self);
    Conn *c = fd >= 0 && fd < self->nconns ? self->conns[fd] : NULL;
    int peer = c && c->peer ? c->peer->fd : -1;
    unlock_relay(self);
    return PyLong_FromLong(peer);
}

static PyObject *Relay_activity(RelayObject *self, PyObject *args) {
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    lock_relay(self);
    Conn *c = fd >= 0 && fd < self->nconns ? self->conns[fd] : NULL;
    PyObject *result;
    if (c == NULL || c->role != ROLE_CLIENT)
        result = Py_NewRef(Py_None);
    else
        result = Py_BuildValue("(KiiLi)", c->requests, c->peer ? c->peer->fd : -1, c->waiting, c->outstanding,
                               c->lazy);
    unlock_relay(self);
    return result;
}

/* relayed_before(fd) -> int: the requests the relay walked for the client it last let go of at fd (as activity()
   counted them), for the caller to judge that client's time in the relay once its event is in hand. */
static PyObject *Relay_relayed_before(RelayObject *self, PyObject *args) {
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    lock_relay(self);
    unsigned int relayed = fd >= 0 && fd < self->nconns ? self->relayed_before[fd] : 0;
    unlock_relay(self);
    return PyLong_FromUnsignedLong(relayed & RELAYED_MAX);
}

/* insert_id(fd) -> int: the last insert id other than 0 of the answers relayed to the client at fd (or, with none
   there, to the client last let go of at fd), else 0 (MySQL: response="mysql"). */
static PyObject *Relay_insert_id(RelayObject *self, PyObject *args) {
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    lock_relay(self);
    Conn *c = fd >= 0 && fd < self->nconns ? self->conns[fd] : NULL;
    unsigned long long id = c ? (c->role == ROLE_CLIENT ? c->insert_id : 0)
                              : fd >= 0 && fd < self->nconns ? self->insert_id_before[fd] : 0;
    unlock_relay(self);
    return PyLong_FromUnsignedLongLong(id);
}

/* set_statements(fd, dict or None) -> int: the named statements the client at fd may bind in the relay ({name: Parse
   body of the unnamed statement}, see "named statements"); how many were usable. */
static PyObject *Relay_set_statements(RelayObject *self, PyObject *args) {
    int fd, failed;
    PyObject *mapping;
    if (!PyArg_ParseTuple(args, "iO", &fd, &mapping))
        return NULL;
    StatementTable *t = statements_from(&self->rules[ROLE_CLIENT], mapping, &failed);
    if (failed)
        return NULL;
    lock_relay(self);
    Conn *c = fd >= 0 && fd < self->nconns ? self->conns[fd] : NULL;
    if (c == NULL || c->role != ROLE_CLIENT) {
        unlock_relay(self);
        PyMem_RawFree(t);
        PyErr_Format(PyExc_ValueError, "fd %d is no client of the relay", fd);
        return NULL;
    }
    PyMem_RawFree(c->st.stmts);
    c->st.stmts = t;
    unlock_relay(self);
    return PyLong_FromLong(t ? t->n : 0);
}

/* lazy_begin(fd) -> int: the transaction code (TXW_BEGIN or TXW_START and its modes) when the client at fd (or, with
   none there, the client last let go of at fd) had a BEGIN answered by the relay and not sent to any backend, else 0
   (pg_begin). */
static PyObject *Relay_lazy_begin(RelayObject *self, PyObject *args) {
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    lock_relay(self);
    Conn *c = fd >= 0 && fd < self->nconns ? self->conns[fd] : NULL;
    long lazy = c ? (c->role == ROLE_CLIENT ? c->lazy : 0)
                  : fd >= 0 && fd < self->nconns ? (long)(self->relayed_before[fd] >> RELAYED_BITS) : 0;
    unlock_relay(self);
    return PyLong_FromLong(lazy);
}

static PyObject *Relay_counts(RelayObject *self, PyObject *unused) {
    return Py_BuildValue("(nnn)", self->n_idle, self->n_waiting, self->n_linked_clients);
}

static int Relay_traverse(RelayObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->wake_handler);
    return 0;
}

static int Relay_clear_refs(RelayObject *self) {
    Py_CLEAR(self->wake_handler);
    return 0;
}

static void Relay_dealloc(RelayObject *self) {
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->wake_handler);
    relay_clear(self);
    pthread_mutex_destroy(&self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* ---------------------------------------------------------------- Relay logins: keyed greetings
 *
 * A keyed greeting (cache_greeting(..., key_at >= 0)) answers its startup packet with the cached reply and a fresh
 * cancel key (8 bytes: PostgreSQL's BackendKeyData pid and secret) written at key_at, taken from the keys the caller
 * gave (add_keys), within the login budget the caller set (set_login_budget). The client is then handed over at once as
 * a GREETED event: data = its key (8 bytes), one byte n and n bytes of its peer's address (a struct sockaddr as accept4
 * or getpeername gives it; n = 0 if that failed), then any bytes it sent after its startup packet; arg = the greeting's
 * template id; the relay forgets it (the caller owns it, as after any event). With keep (cache_greeting) the client
 * stays in the relay instead, as a client added with add_client would: data = its key and its address alone, and what
 * it sent after its startup packet is relayed as its first requests. The relay still closes it at EOF or at a hangup
 * frame between transactions, then with a GONE event (fd, no data), until the caller takes the socket over (disown(fd):
 * such frames are events again; a closing relay forgets it). With no key left or no budget, the startup packet goes to
 * the caller as a STARTUP event, as an unknown one would.
 *
 * Quiet clients: with set_quiet(True) a kept client is not reported at its greeting. The relay keeps its key, its
 * greeting's id and its address (accept4's) in its Conn and counts it (quiet_counts: greeted, gone); at its goodbye it
 * is closed and counted, with no event. It is reported, as a QUIET event with GREETED's data followed by when it was
 * greeted (8 bytes: a C double of seconds since the epoch), before any other event of it or of its linked backend
 * (emit), or by take_quiet(); from then on it is a kept client like any other.
 */

/* A GREETED (or QUIET) event of client c: its key, one byte n and n bytes of its peer's address, then `rest`. */
static int queue_greeted(RelayObject *r, Conn *c, int kind, const unsigned char *key, int template_id, size_t rest,
                         const unsigned char *rest_data) {
    struct sockaddr_storage peer;
    socklen_t peer_len = c->addr_len;
    if (peer_len)
        memcpy(&peer, c->addr, peer_len);
    else if (peer_len = sizeof(peer), getpeername(c->fd, (struct sockaddr *)&peer, &peer_len) < 0 || peer_len > 255)
        peer_len = 0;
    Event *ev = PyMem_RawMalloc(sizeof(Event) + 9 + peer_len + rest);
    if (ev == NULL)
        return -1;
    ev->next = NULL;
    ev->kind = kind;
    ev->fd = c->fd;
    ev->peer_fd = -1;
    ev->arg = template_id;
    ev->len = 9 + peer_len + rest;
    memcpy(ev->data, key, 8);
    ev->data[8] = (unsigned char)peer_len;
    memcpy(ev->data + 9, &peer, peer_len);
    if (rest)
        memcpy(ev->data + 9 + peer_len, rest_data, rest);
    *r->queue_tail = ev;
    r->queue_tail = &ev->next;
    return 0;
}

/* A quiet client is reported: a QUIET event (as GREETED: its key, its address, then when it was greeted as a C double
   of seconds since the epoch; arg: its template), before any other event of it, or at take_quiet(). Out of memory,
   it stays unknown to the caller (its GONE finds no session). */
static void report_quiet(RelayObject *r, Conn *c) {
    c->quiet = 0;
    r->n_quiet--;
    queue_greeted(r, c, EV_QUIET, c->key, c->template_id, sizeof(c->greeted_at), (const unsigned char *)&c->greeted_at);
}

static int greet_with_key(RelayObject *r, Conn *c, const Greeting *g, size_t plen, const unsigned char *before,
                          size_t before_len) {
    if (r->n_keys == 0 || r->login_budget == 0) {
        give_back_starting(r, c);
        return -1;
    }
    const unsigned char *key = r->keys + 8 * (r->n_keys - 1);
    size_t total = before_len + g->reply_len;
    unsigned char small[1024];
    unsigned char *reply = total <= sizeof(small) ? small : PyMem_RawMalloc(total);
    if (reply == NULL) {
        give_back_starting(r, c);
        return -1;
    }
    if (before_len)
        memcpy(reply, before, before_len);
    memcpy(reply + before_len, g->reply, g->reply_len);
    memcpy(reply + before_len + g->key_at, key, 8);
    int failed = send_all_now(c->fd, reply, total) < 0;     /* a fresh socket's send buffer is empty */
    int err = errno;
    if (reply != small)
        PyMem_RawFree(reply);
    if (failed) {
        hand_over(r, EV_CLOSED, c, err);     /* its key was not used: it stays for the next client */
        return -1;
    }
    if (g->keep && r->quiet_mode) {
        memcpy(c->key, key, 8);     /* reported when needed (report_quiet), or closed unreported (hang_up) */
        c->template_id = g->template_id;
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        c->greeted_at = (double)now.tv_sec + now.tv_nsec / 1e9;
        c->quiet = 1;
        r->n_quiet++;
        r->quiet_greeted++;
    } else if (queue_greeted(r, c, EV_GREETED, key, g->template_id, g->keep ? 0 : c->len - plen, c->buf + plen) < 0) {
        hand_over(r, EV_CLOSED, c, ENOMEM);  /* greeted but not reported: the caller closes it; the key stays */
        return -1;
    }
    PyMem_RawFree(c->login);
    c->login = NULL;
    r->n_keys--;
    if (r->login_budget > 0)
        r->login_budget--;
    r->greeted++;
    r->logins++;
    if (g->keep) {
        memmove(c->buf, c->buf + plen, c->len - plen);
        c->len -= plen;
        c->starting = 0;
        c->report = 1;          /* still the relay's to close (at EOF, at a hangup frame), with a GONE event */
        return 0;               /* pump walks what it sent after its startup packet */
    }
    forget(r, c);
    r->handed_over++;
    return -1;
}

/* ---------------------------------------------------------------- Relay logins: SCRAM
 *
 * A keyed greeting cached with scram=(tail, stored_key, server_key) is sent after a SCRAM-SHA-256 exchange (RFC 5802,
 * RFC 7677, as PostgreSQL runs it: no channel binding, the user name of the startup packet) that the relay verifies
 * from the user's stored keys: AuthenticationSASL for the startup packet, AuthenticationSASLContinue with the
 * server-first-message (the client's nonce, 18 random bytes of the relay's in base64, then `tail`: ",s=<salt>,i=<n>")
 * for the SASLInitialResponse, and for a SASLResponse whose proof holds AuthenticationSASLFinal followed by the
 * greeting with its key (a GREETED event, as above). Anything else goes to the caller as an ANSWERED event, which
 * carries what the engine needs to take the login over where the relay stands: data = one byte n, the relay's nonce (n
 * bytes), then every byte the client sent (its startup packet first); arg = how many of those bytes the relay answered.
 * So are a proof that does not hold (the engine fails it, with its delays and counts), a message the relay does not
 * take as PostgreSQL would (another mechanism, channel binding, an extension, a name that is not printable ASCII, a
 * message longer than its limits: the engine answers it), a greeting forgotten meanwhile, no key or no budget at the
 * end, and the clients that take_starting() and unlisten() give back.
 */

static inline uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline void put_be32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* A starting client goes back to the caller: STARTUP with its bytes, or ANSWERED in a SCRAM exchange. */
static void give_back_starting(RelayObject *r, Conn *c) {
    Login *l = c->login;
    if (l == NULL) {
        hand_over(r, EV_STARTUP, c, 0);     /* its bytes so far (fwd is 0 while it starts) */
        return;
    }
    Event *ev = PyMem_RawMalloc(sizeof(Event) + 1 + SCRAM_NONCE + c->len);
    int fd = c->fd;
    if (ev != NULL) {
        ev->next = NULL;
        ev->kind = EV_ANSWERED;
        ev->fd = fd;
        ev->peer_fd = -1;
        ev->arg = (int)l->answered;
        ev->len = 1 + SCRAM_NONCE + c->len;
        ev->data[0] = SCRAM_NONCE;
        memcpy(ev->data + 1, l->snonce, SCRAM_NONCE);
        memcpy(ev->data + 1 + SCRAM_NONCE, c->buf, c->len);
        *r->queue_tail = ev;
        r->queue_tail = &ev->next;
    }
    forget(r, c);
    r->handed_over++;
    if (ev == NULL)
        close(fd);              /* the relay accepted it and nobody else knows of it */
}

static const Greeting *greeting_of(RelayObject *r, int template_id) {
    const Greeting *g = r->greetings;
    while (g && g->template_id != template_id)
        g = g->next;
    return g;
}

static int scram_begin(RelayObject *r, Conn *c, const Greeting *g, size_t plen) {
    static const unsigned char sasl[] = {'R', 0, 0, 0, 23, 0, 0, 0, 10, 'S', 'C', 'R', 'A', 'M', '-', 'S', 'H', 'A',
                                         '-', '2', '5', '6', 0, 0};
    unsigned char raw[SCRAM_NONCE_RAW];
    Login *l = NULL;
    if (r->n_keys == 0 || r->login_budget == 0 || (l = PyMem_RawMalloc(sizeof(Login))) == NULL ||
        getrandom(raw, sizeof(raw), GRND_NONBLOCK) != (ssize_t)sizeof(raw)) {
        PyMem_RawFree(l);
        hand_over(r, EV_STARTUP, c, 0);
        return -1;
    }
    memset(l, 0, sizeof(*l));
    b64_encode(raw, sizeof(raw), l->snonce);
    l->template_id = g->template_id;
    l->phase = 1;
    l->answered = plen;
    c->login = l;
    if (send_all_now(c->fd, sasl, sizeof(sasl)) < 0) {     /* a fresh socket's send buffer is empty */
        hand_over(r, EV_CLOSED, c, errno);
        return -1;
    }
    return scram_step(r, c);
}

/* The SASLInitialResponse: "SCRAM-SHA-256", its length, "n,," or "y,,", then exactly n=<name>,r=<nonce>. */
static int scram_first(RelayObject *r, Conn *c, const Greeting *g, const unsigned char *body, size_t blen,
                       size_t next) {
    Login *l = c->login;
    static const char mech[14] = "SCRAM-SHA-256";
    if (blen < 18 || memcmp(body, mech, sizeof(mech)) != 0 || be32(body + 14) != blen - 18)
        return 1;
    const unsigned char *d = body + 18, *end = body + blen;
    if (blen - 18 < 3 || (d[0] != 'n' && d[0] != 'y') || d[1] != ',' || d[2] != ',')
        return 1;
    const unsigned char *bare = d + 3, *p = bare + 2;
    if (end - bare < 2 || end - bare > SCRAM_TEXT_MAX || bare[0] != 'n' || bare[1] != '=')
        return 1;
    for (; p < end && *p != ','; p++) {     /* the name (PostgreSQL takes the startup packet's): escapes well formed */
        if (*p < 0x20 || *p > 0x7e)
            return 1;
        if (*p == '=' && !(end - p >= 3 && ((p[1] == '2' && p[2] == 'C') || (p[1] == '3' && p[2] == 'D'))))
            return 1;
    }
    if (end - p < 4 || p[1] != 'r' || p[2] != '=')
        return 1;
    const unsigned char *cnonce = p + 3;
    for (p = cnonce; p < end; p++)          /* printable, no comma: nothing follows the nonce */
        if (*p < 0x21 || *p > 0x7e || *p == ',')
            return 1;
    size_t cnonce_len = (size_t)(end - cnonce);
    unsigned char out[9 + 2 + SCRAM_TEXT_MAX + SCRAM_NONCE + SCRAM_TAIL_MAX];
    size_t n = 9;
    memcpy(out + n, "r=", 2);
    n += 2;
    memcpy(out + n, cnonce, cnonce_len);
    n += cnonce_len;
    memcpy(out + n, l->snonce, SCRAM_NONCE);
    n += SCRAM_NONCE;
    memcpy(out + n, g->tail, g->tail_len);
    n += g->tail_len;
    out[0] = 'R';
    put_be32(out + 1, (uint32_t)(n - 1));
    put_be32(out + 5, 11);                  /* AuthenticationSASLContinue */
    if (send_all_now(c->fd, out, n) < 0) {
        hand_over(r, EV_CLOSED, c, errno);
        return -1;
    }
    l->phase = 2;
    l->gs2_y = d[0] == 'y';
    l->bare_at = (size_t)(bare - c->buf);
    l->bare_len = (size_t)(end - bare);
    l->cnonce_len = cnonce_len;
    l->answered = next;
    return 0;
}

/* The SASLResponse: exactly c=<base64 of the GS2 header>,r=<the whole nonce>,p=<base64 proof>. */
static int scram_final(RelayObject *r, Conn *c, const Greeting *g, const unsigned char *body, size_t blen,
                       size_t next) {
    Login *l = c->login;
    const unsigned char *bare = c->buf + l->bare_at;
    const unsigned char *cnonce = bare + l->bare_len - l->cnonce_len;
    size_t without_proof = 9 + l->cnonce_len + SCRAM_NONCE;
    unsigned char proof[32], signature[32], client_key[32], stored[32];
    if (blen != without_proof + 3 + 44 || memcmp(body, l->gs2_y ? "c=eSws,r=" : "c=biws,r=", 9) != 0 ||
        memcmp(body + 9, cnonce, l->cnonce_len) != 0 || memcmp(body + 9 + l->cnonce_len, l->snonce, SCRAM_NONCE) ||
        memcmp(body + without_proof, ",p=", 3) != 0 ||
        b64_decode((const char *)body + without_proof + 3, 44, proof, sizeof(proof)) != 32)
        return 1;
    /* AuthMessage: client-first-message-bare "," server-first-message "," client-final-message-without-proof */
    unsigned char auth[SCRAM_TEXT_MAX + 1 + 2 + SCRAM_TEXT_MAX + SCRAM_NONCE + SCRAM_TAIL_MAX + 1 + 9 + SCRAM_TEXT_MAX
                       + SCRAM_NONCE];
    size_t n = 0;
    memcpy(auth, bare, l->bare_len);
    n += l->bare_len;
    memcpy(auth + n, ",r=", 3);
    n += 3;
    memcpy(auth + n, cnonce, l->cnonce_len);
    n += l->cnonce_len;
    memcpy(auth + n, l->snonce, SCRAM_NONCE);
    n += SCRAM_NONCE;
    memcpy(auth + n, g->tail, g->tail_len);
    n += g->tail_len;
    auth[n++] = ',';
    memcpy(auth + n, body, without_proof);
    n += without_proof;
    hmac_sha256(g->stored_key, 32, auth, n, NULL, 0, signature);
    for (int i = 0; i < 32; i++)
        client_key[i] = proof[i] ^ signature[i];
    sha256(client_key, 32, stored);
    if (ct_differ(stored, g->stored_key, 32) || r->n_keys == 0 || r->login_budget == 0)
        return 1;               /* the engine judges it: fails it as a wrong password, or logs it in */
    unsigned char final[9 + 2 + 44];
    final[0] = 'R';
    put_be32(final + 1, sizeof(final) - 1);
    put_be32(final + 5, 12);                /* AuthenticationSASLFinal */
    memcpy(final + 9, "v=", 2);
    hmac_sha256(g->server_key, 32, auth, n, NULL, 0, signature);
    b64_encode(signature, 32, (char *)final + 11);
    return greet_with_key(r, c, g, next, final, sizeof(final));
}

/* A starting client in a SCRAM exchange has sent more: its next SASL message, whole, is answered here. */
static int scram_step(RelayObject *r, Conn *c) {
    Login *l = c->login;
    size_t at = l->answered;
    if (at + 5 > r->bufsize) {      /* no room for a header: a full buffer would never be read again */
        give_back_starting(r, c);
        return -1;
    }
    if (c->len - at < 5)
        return 0;
    const unsigned char *m = c->buf + at;
    size_t mlen = be32(m + 1);
    const Greeting *g = greeting_of(r, l->template_id);
    if (m[0] != 'p' || mlen < 4 || mlen + 1 > r->bufsize - at || g == NULL) {
        give_back_starting(r, c);
        return -1;
    }
    if (c->len - at < mlen + 1)
        return 0;
    int step = l->phase == 1 ? scram_first(r, c, g, m + 5, mlen - 4, at + 1 + mlen)
                             : scram_final(r, c, g, m + 5, mlen - 4, at + 1 + mlen);
    if (step > 0) {
        give_back_starting(r, c);
        return -1;
    }
    return step;
}

static PyObject *Relay_add_keys(RelayObject *self, PyObject *arg) {
    Py_buffer keys;
    if (PyObject_GetBuffer(arg, &keys, PyBUF_SIMPLE) < 0)
        return NULL;
    if (keys.len % 8) {
        PyBuffer_Release(&keys);
        return PyErr_Format(PyExc_ValueError, "add_keys: 8 bytes per key");
    }
    lock_relay(self);
    size_t need = self->n_keys + (size_t)keys.len / 8;
    if (need > self->keys_cap) {
        size_t cap = self->keys_cap ? self->keys_cap : 64;
        while (cap < need)
            cap *= 2;
        unsigned char *grown = PyMem_RawRealloc(self->keys, cap * 8);
        if (grown == NULL) {
            unlock_relay(self);
            PyBuffer_Release(&keys);
            return PyErr_NoMemory();
        }
        self->keys = grown;
        self->keys_cap = cap;
    }
    /* Used from the end: the new keys go below the ones held, reversed, so that keys are used in the order given. */
    size_t given = (size_t)keys.len / 8;
    memmove(self->keys + keys.len, self->keys, self->n_keys * 8);
    for (size_t i = 0; i < given; i++)
        memcpy(self->keys + 8 * (given - 1 - i), (const unsigned char *)keys.buf + 8 * i, 8);
    self->n_keys = need;
    unlock_relay(self);
    PyBuffer_Release(&keys);
    return PyLong_FromSize_t(need);
}

static PyObject *Relay_set_login_budget(RelayObject *self, PyObject *args) {
    long long budget;
    int gives_back = 0;
    if (!PyArg_ParseTuple(args, "L|p", &budget, &gives_back))
        return NULL;
    if (budget < -1)
        return PyErr_Format(PyExc_ValueError, "set_login_budget: -1 or more");
    lock_relay(self);
    self->login_budget = budget;
    self->budget_gives_back = gives_back;
    unlock_relay(self);
    Py_RETURN_NONE;
}

static PyObject *Relay_forget_greetings(RelayObject *self, PyObject *unused) {
    lock_relay(self);
    while (self->greetings) {
        Greeting *next = self->greetings->next;
        PyMem_RawFree(self->greetings);
        self->greetings = next;
    }
    unlock_relay(self);
    Py_RETURN_NONE;
}

static PyObject *Relay_take_starting(RelayObject *self, PyObject *args) {
    int aged_only = 0;
    if (!PyArg_ParseTuple(args, "|p", &aged_only))
        return NULL;
    if (self->epfd < 0)
        return PyErr_Format(PyExc_ValueError, "relay is closed");
    lock_relay(self);
    for (int fd = 0; fd < self->nconns; fd++) {
        Conn *c = self->conns[fd];
        if (c == NULL || c->role != ROLE_CLIENT || !c->starting)
            continue;
        if (aged_only && !c->aged)
            c->aged = 1;                            /* handed over at the next call if it still starts then */
        else
            give_back_starting(self, c);
    }
    PyObject *events = take_events(self);
    unlock_relay(self);
    return events;
}

static PyObject *Relay_set_quiet(RelayObject *self, PyObject *arg) {
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    lock_relay(self);
    self->quiet_mode = on;
    unlock_relay(self);
    Py_RETURN_NONE;
}

static PyObject *Relay_take_quiet(RelayObject *self, PyObject *unused) {
    if (self->epfd < 0)
        return PyErr_Format(PyExc_ValueError, "relay is closed");
    lock_relay(self);
    for (int fd = 0; fd < self->nconns && self->n_quiet; fd++) {
        Conn *c = self->conns[fd];
        if (c && c->quiet)
            report_quiet(self, c);
    }
    PyObject *events = take_events(self);
    unlock_relay(self);
    return events;
}

/* age_quiet(now, idle_limit, busy_limit, transaction_limit) -> (events, [(fd, state, since)]): the client timeouts
   of quiet clients, judged here so that they need no session. Each quiet client's state (WATCH_IDLE: no backend;
   WATCH_BUSY: a request outstanding on its backend, or waiting for one; WATCH_TRANSACTION: linked with nothing
   outstanding, so idle inside a transaction) and its requests walked are compared with the last call's: a change
   (or a client not seen yet) starts its clock at `now`. Those whose state has lasted its limit (seconds; 0: none) are
   reported (their QUIET events, returned with any other events queued) and listed with their state and since when,
   for the caller to act on through their sessions. The caller calls it at its timeouts' sweep pace; nothing of it
   runs per request. */
static PyObject *Relay_age_quiet(RelayObject *self, PyObject *args) {
    double now, limits[3];
    if (!PyArg_ParseTuple(args, "dddd", &now, &limits[WATCH_IDLE], &limits[WATCH_BUSY], &limits[WATCH_TRANSACTION]))
        return NULL;
    if (self->epfd < 0)
        return PyErr_Format(PyExc_ValueError, "relay is closed");
    PyObject *overdue = PyList_New(0);
    if (overdue == NULL)
        return NULL;
    lock_relay(self);
    for (int fd = 0; fd < self->nconns && self->n_quiet; fd++) {
        Conn *c = self->conns[fd];
        if (c == NULL || !c->quiet)
            continue;
        if (c->lazy && c->peer == NULL && !c->waiting) {
            c->watch_since = 0.0;   /* idle in a BEGIN the relay answered: left alone, as the Python path leaves it */
            continue;
        }
        unsigned char state = c->waiting ? WATCH_BUSY
                              : c->peer == NULL ? WATCH_IDLE : c->outstanding > 0 ? WATCH_BUSY : WATCH_TRANSACTION;
        if (c->watch_since == 0.0 || state != c->watch_state || c->requests != c->watch_requests) {
            c->watch_state = state;
            c->watch_requests = c->requests;
            c->watch_since = now;
            continue;
        }
        double limit = limits[state];
        if (limit <= 0.0 || now - c->watch_since < limit)
            continue;
        PyObject *item = Py_BuildValue("(iid)", c->fd, (int)state, c->watch_since);
        if (item == NULL || PyList_Append(overdue, item) < 0) {
            Py_XDECREF(item);
            Py_CLEAR(overdue);
            break;
        }
        Py_DECREF(item);
        report_quiet(self, c);
    }
    PyObject *events = take_events(self);
    unlock_relay(self);
    if (events == NULL || overdue == NULL) {    /* out of memory: the error stands */
        Py_XDECREF(events);
        Py_XDECREF(overdue);
        return NULL;
    }
    PyObject *result = PyTuple_Pack(2, events, overdue);
    Py_DECREF(events);
    Py_DECREF(overdue);
    return result;
}

static PyObject *Relay_report_key(RelayObject *self, PyObject *arg) {
    Py_buffer key;
    if (PyObject_GetBuffer(arg, &key, PyBUF_SIMPLE) < 0)
        return NULL;
    if (key.len != 8) {
        PyBuffer_Release(&key);
        return PyErr_Format(PyExc_ValueError, "report_key: a key of 8 bytes");
    }
    if (self->epfd < 0) {
        PyBuffer_Release(&key);
        return PyErr_Format(PyExc_ValueError, "relay is closed");
    }
    lock_relay(self);
    for (int fd = 0; fd < self->nconns && self->n_quiet; fd++) {
        Conn *c = self->conns[fd];
        if (c && c->quiet && memcmp(c->key, key.buf, 8) == 0) {
            report_quiet(self, c);
            break;
        }
    }
    PyObject *events = take_events(self);
    unlock_relay(self);
    PyBuffer_Release(&key);
    return events;
}

static PyObject *Relay_quiet_counts(RelayObject *self, PyObject *unused) {
    lock_relay(self);
    PyObject *counts = Py_BuildValue("(KK)", self->quiet_greeted, self->quiet_gone);
    self->quiet_greeted = self->quiet_gone = 0;
    unlock_relay(self);
    return counts;
}

static PyObject *Relay_unlisten(RelayObject *self, PyObject *unused) {
    if (self->epfd < 0)
        return PyErr_Format(PyExc_ValueError, "relay is closed");
    lock_relay(self);
    for (int fd = 0; fd < self->nconns; fd++) {
        Conn *c = self->conns[fd];
        if (c == NULL)
            continue;
        if (c->role == ROLE_LISTENER)
            forget(self, c);
        else if (c->starting)
            give_back_starting(self, c);
    }
    PyObject *events = take_events(self);
    unlock_relay(self);
    return events;
}

static PyMethodDef Relay_methods[] = {
    {"add_client", (PyCFunction)Relay_add_client, METH_VARARGS,
     "add_client(fd, data=b'') -> events: relay a client from now on; data: bytes already read from it."},
    {"add_backend", (PyCFunction)Relay_add_backend, METH_VARARGS,
     "add_backend(fd) -> events: a logged-in backend at a transaction boundary, to lend to clients."},
    {"run_ready", (PyCFunction)Relay_run_ready, METH_VARARGS,
     "run_ready(max_events=256) -> events: serve every ready socket without blocking (threaded: take the events "
     "the relay thread queued)."},
    {"fileno", (PyCFunction)Relay_fileno, METH_NOARGS,
     "Readable when run_ready has work: the epoll fd, or (threaded) the eventfd of queued events."},
    {"close", (PyCFunction)Relay_close, METH_NOARGS,
     "Stop the thread, forget every socket (closing none) and close the relay's own fds."},
    {"stats", (PyCFunction)Relay_stats, METH_NOARGS, "Counts of connections, idle backends, waiting clients."},
    {"take_idle", (PyCFunction)Relay_take_idle, METH_NOARGS,
     "take_idle() -> fd: forget an idle backend and give it back to the caller (-1: none is idle)."},
    {"disown", (PyCFunction)Relay_disown, METH_VARARGS,
     "disown(fd) -> bool: a client kept at a keyed greeting is the caller's to close from now on (its EOF and hangup "
     "frames are events again); False if the relay holds no such client."},
    {"remove", (PyCFunction)Relay_remove, METH_VARARGS,
     "remove(fd) -> bytes or None: forget a client that holds no backend (its bytes not yet sent), or an idle "
     "backend; None when fd is linked, held or unknown."},
    {"take_waiting", (PyCFunction)Relay_take_waiting, METH_NOARGS,
     "take_waiting() -> (fd, bytes) or None: forget the client that has waited longest for a backend and give it "
     "back with its bytes not yet sent."},
    {"set_yield", (PyCFunction)Relay_set_yield, METH_O,
     "set_yield(on) -> events: while on, no backend is lent by the relay itself (free ones go idle, for take_idle); "
     "off: the idle backends are lent to the waiting clients."},
    {"age_quiet", (PyCFunction)Relay_age_quiet, METH_VARARGS,
     "age_quiet(now, idle_limit, busy_limit, transaction_limit) -> (events, [(fd, state, since)]): quiet clients "
     "whose state (0 idle, 1 awaiting an answer or a backend, 2 idle in a transaction) lasted its limit, reported."},
    {"age_waiting", (PyCFunction)Relay_age_waiting, METH_O,
     "age_waiting(limit) -> [(fd, bytes)]: one tick more for every waiting client; those with `limit` ticks are "
     "forgotten and given back, longest waiting first."},
    {"peer", (PyCFunction)Relay_peer, METH_VARARGS,
     "peer(fd) -> fd: the socket linked to fd now (a client's backend, a backend's client), or -1."},
    {"activity", (PyCFunction)Relay_activity, METH_VARARGS,
     "activity(fd) -> (requests, peer fd or -1, waiting, outstanding, lazy) of a client: requests walked since it "
     "was given to the relay, the backend serving it now, whether it waits for one, requests not answered yet, a "
     "BEGIN the relay answered and has not sent (lazy_begin); None for a backend or an unknown fd."},
    {"relayed_before", (PyCFunction)Relay_relayed_before, METH_VARARGS,
     "relayed_before(fd) -> int: requests walked for the client last let go of at fd (0: none known)."},
    {"insert_id", (PyCFunction)Relay_insert_id, METH_VARARGS,
     "insert_id(fd) -> int: the last insert id other than 0 of the MySQL answers relayed to the client at fd, or to "
     "the client last let go of at fd; else 0."},
    {"set_statements", (PyCFunction)Relay_set_statements, METH_VARARGS,
     "set_statements(fd, dict or None) -> int: the named statements the client at fd may bind in the relay ({name: "
     "Parse body of the unnamed statement}); how many were usable."},
    {"lazy_begin", (PyCFunction)Relay_lazy_begin, METH_VARARGS,
     "lazy_begin(fd) -> int: the transaction code (1: BEGIN, 2: START TRANSACTION, and its modes above the low three "
     "bits) when the client at fd, or the client last let go of at fd, had a BEGIN answered by the relay and not "
     "sent; else 0."},
    {"counts", (PyCFunction)Relay_counts, METH_NOARGS, "counts() -> (idle backends, waiting clients, linked clients)."},
    {"listen", (PyCFunction)(void (*)(void))Relay_listen, METH_VARARGS | METH_KEYWORDS,
     "listen(fd, refuse=b'', refusal=b'', hangup=b'') -> events: accept clients on this listening socket."},
    {"cache_greeting", (PyCFunction)(void (*)(void))Relay_cache_greeting, METH_VARARGS | METH_KEYWORDS,
     "cache_greeting(startup, reply, key_at=-1, template=0, keep=False): answer this exact startup packet with "
     "reply, in the relay; key_at >= 0: with a fresh cancel key (add_keys) written at key_at, the client then handed "
     "over as a GREETED event whose arg is template (keep: it stays in the relay as a client, the event tells of it)."},
    {"add_keys", (PyCFunction)Relay_add_keys, METH_O,
     "add_keys(keys) -> count: 8-byte cancel keys for keyed greetings; the count the relay holds now."},
    {"set_login_budget", (PyCFunction)Relay_set_login_budget, METH_VARARGS,
     "set_login_budget(n, gives_back=False): keyed greetings allowed from now on (each one uses one; gives_back: a "
     "quiet client's goodbye gives one back; -1: no limit); while it is 0, every wake-up is whole."},
    {"forget_greetings", (PyCFunction)Relay_forget_greetings, METH_NOARGS,
     "forget_greetings(): every cached greeting is dropped (their startups become STARTUP events)."},
    {"take_starting", (PyCFunction)Relay_take_starting, METH_VARARGS,
     "take_starting(aged_only=False) -> events: the clients still in their startup as STARTUP events with the bytes "
     "read; aged_only: only those that were starting at the previous such call (the others are marked)."},
    {"set_quiet", (PyCFunction)Relay_set_quiet, METH_O,
     "set_quiet(on): a client kept at a keyed greeting is not reported (quiet) until an event of it, take_quiet(), or "
     "its close (counted by quiet_counts, no event)."},
    {"take_quiet", (PyCFunction)Relay_take_quiet, METH_NOARGS,
     "take_quiet() -> events: every quiet client reported, as QUIET events (data and arg as GREETED's)."},
    {"report_key", (PyCFunction)Relay_report_key, METH_O,
     "report_key(key) -> events: the quiet client greeted with this 8-byte key, if any, reported (a QUIET event)."},
    {"quiet_counts", (PyCFunction)Relay_quiet_counts, METH_NOARGS,
     "quiet_counts() -> (greeted, gone): clients kept quietly, and quiet clients closed unreported, since the last "
     "call."},
    {"wake", (PyCFunction)Relay_wake, METH_NOARGS,
     "wake() -> the handler's result or None: fileno() is readable; serve it with no Python unless the handler is "
     "needed (see set_wake)."},
    {"set_wake", (PyCFunction)Relay_set_wake, METH_O,
     "set_wake(handler): wake() calls handler(None) for a whole wake-up (its own run_ready), handler(events) after "
     "serving when there are events, waiting clients or few keys; None: no handler."},
    {"set_wake_rules", (PyCFunction)Relay_set_wake_rules, METH_VARARGS,
     "set_wake_rules(eager, keys_low=0): eager, every wake-up is whole; fewer keys than keys_low calls the handler."},
    {"unlisten", (PyCFunction)Relay_unlisten, METH_NOARGS,
     "unlisten() -> events: stop accepting (the listening sockets are forgotten, not closed); clients still in "
     "their startup come back as STARTUP events with the bytes read."},
    {NULL},
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "multiproxy._relay.Relay",
    .tp_basicsize = sizeof(RelayObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)Relay_traverse,
    .tp_clear = (inquiry)Relay_clear_refs,
    .tp_doc = "Linked client/backend pairs and idle backends, served by run_ready() with no Python per message.",
    .tp_new = Relay_new,
    .tp_init = (initproc)Relay_init,
    .tp_dealloc = (destructor)Relay_dealloc,
    .tp_methods = Relay_methods,
};

static PyMethodDef module_methods[] = {
    {"attend", relay_attend, METH_NOARGS,
     "attend(): every relay's next wake-up is whole (what its handler judges may have changed)."},
    {NULL},
};

static struct PyModuleDef relay_module = {
    PyModuleDef_HEAD_INIT, "multiproxy._relay", "The compiled relay core (see multiproxy/relay_core.py).", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__relay(void) {
    if (PyType_Ready(&WalkerType) < 0 || PyType_Ready(&RelayType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&relay_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&WalkerType);
    Py_INCREF(&RelayType);
    if (PyModule_AddObject(m, "Walker", (PyObject *)&WalkerType) < 0 ||
        PyModule_AddObject(m, "Relay", (PyObject *)&RelayType) < 0 ||
        PyModule_AddIntConstant(m, "NONE", EV_NONE) < 0 || PyModule_AddIntConstant(m, "BOUNDARY", EV_BOUNDARY) < 0 ||
        PyModule_AddIntConstant(m, "HANDOVER", EV_HANDOVER) < 0 ||
        PyModule_AddIntConstant(m, "MALFORMED", EV_MALFORMED) < 0 ||
        PyModule_AddIntConstant(m, "CLOSED", EV_CLOSED) < 0 ||
        PyModule_AddIntConstant(m, "UNSOLICITED", EV_UNSOLICITED) < 0 ||
        PyModule_AddIntConstant(m, "STARTUP", EV_STARTUP) < 0 ||
        PyModule_AddIntConstant(m, "ANSWERED", EV_ANSWERED) < 0 ||
        PyModule_AddIntConstant(m, "QUIET", EV_QUIET) < 0 || PyModule_AddIntConstant(m, "NAMED", EV_NAMED) < 0 ||
        PyModule_AddIntConstant(m, "GREETED", EV_GREETED) < 0 || PyModule_AddIntConstant(m, "GONE", EV_GONE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
