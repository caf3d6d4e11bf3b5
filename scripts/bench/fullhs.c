/* LD_PRELOAD shim for wrk: forces a full TLS handshake on every connection
 * and counts what the handshakes really were.
 *
 * wrk reuses one SSL object per connection slot and resets it with
 * SSL_clear(), which keeps the last session, so every reconnect would offer
 * it for resumption (a TLS 1.3 ticket/PSK). Here SSL_clear() first drops the
 * session, so each SSL_connect() starts from nothing. Every completed
 * SSL_connect() is counted as full or resumed (SSL_session_reused) along with
 * the negotiated protocol, cipher suite and group; the totals are written at
 * exit to the file named by FULLHS_OUT, so the benchmark can prove that no
 * handshake was resumed. Built by scripts/bench/run with `cc -shared -fPIC`.
 * FULLHS_KEEP_SESSIONS=1 keeps wrk's own behaviour (for showing the difference).
 * No OpenSSL headers needed: only opaque pointers and stable 3.0 functions.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct ssl_st SSL;
typedef struct ssl_session_st SSL_SESSION;
typedef struct ssl_cipher_st SSL_CIPHER;

extern SSL_SESSION *SSL_get_session(const SSL *s);
extern int SSL_set_session(SSL *s, SSL_SESSION *sess);
extern int SSL_session_reused(const SSL *s);
extern const char *SSL_get_version(const SSL *s);
extern const SSL_CIPHER *SSL_get_current_cipher(const SSL *s);
extern const char *SSL_CIPHER_get_name(const SSL_CIPHER *c);
extern long SSL_ctrl(SSL *s, int cmd, long larg, void *parg);
/* SSL_get_negotiated_group() is a macro over this control. */
#define CTRL_GET_NEGOTIATED_GROUP 134
extern const char *OBJ_nid2sn(int n);

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned long full_count, resumed_count;
/* The distinct "protocol cipher group" strings seen, space-separated. */
static char kinds[512];

int SSL_clear(SSL *s) {
    static int (*real)(SSL *);
    if (!real)
        real = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_clear");
    static int keep = -1;
    if (keep < 0)
        keep = getenv("FULLHS_KEEP_SESSIONS") != NULL;
    if (!keep && SSL_get_session(s) != NULL)
        SSL_set_session(s, NULL);
    return real(s);
}

int SSL_connect(SSL *s) {
    static int (*real)(SSL *);
    if (!real)
        real = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_connect");
    int r = real(s);
    if (r == 1) {
        char kind[128];
        const SSL_CIPHER *c = SSL_get_current_cipher(s);
        const char *group = OBJ_nid2sn((int)SSL_ctrl(s, CTRL_GET_NEGOTIATED_GROUP, 0, NULL));
        snprintf(kind, sizeof kind, "%s/%s/%s", SSL_get_version(s),
                 c ? SSL_CIPHER_get_name(c) : "none", group ? group : "none");
        pthread_mutex_lock(&lock);
        if (SSL_session_reused(s))
            resumed_count++;
        else
            full_count++;
        if (!strstr(kinds, kind) && strlen(kinds) + strlen(kind) + 2 < sizeof kinds) {
            if (kinds[0])
                strcat(kinds, ",");
            strcat(kinds, kind);
        }
        pthread_mutex_unlock(&lock);
    }
    return r;
}

__attribute__((destructor)) static void report(void) {
    const char *path = getenv("FULLHS_OUT");
    if (!path)
        return;
    FILE *f = fopen(path, "w");
    if (!f)
        return;
    fprintf(f, "full=%lu resumed=%lu kinds=%s\n", full_count, resumed_count, kinds);
    fclose(f);
}
