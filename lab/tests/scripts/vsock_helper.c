/* A tiny static vsock tool for the lab's test guests (busybox has no AF_VSOCK).
 *
 *   vsock_helper echo PORT FILE   listen on vsock PORT, accept one connection, read an 8-byte
 *                                 little-endian length and that many bytes into FILE, send FILE
 *                                 back, close (a length, not EOF: the hybrid vsock muxer turns a host
 *                                 client's half-close into a full shutdown, as Firecracker's does)
 *   vsock_helper send CID PORT    connect to CID:PORT, copy stdin to it, shut down writing, copy
 *                                 what comes back to stdout
 * Built by lab/tests/test_virtio_lab.py with `gcc -static -O2`.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static char buf[1 << 16];

/* copy up to `limit` bytes (or to EOF when limit < 0) */
static int copy_n(int from, int to, long long limit) {
    while (limit != 0) {
        size_t want = sizeof buf;
        if (limit > 0 && (long long)want > limit) want = (size_t)limit;
        ssize_t n = read(from, buf, want);
        if (n == 0) return limit > 0 ? (fprintf(stderr, "short read\n"), -1) : 0;
        if (n < 0) { if (errno == EINTR) continue; perror("read"); return -1; }
        if (limit > 0) limit -= n;
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(to, buf + off, n - off);
            if (w < 0) { if (errno == EINTR) continue; perror("write"); return -1; }
            off += w;
        }
    }
    return 0;
}

static int copy(int from, int to) { return copy_n(from, to, -1); }

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "echo") == 0) {
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY,
                                .svm_port = (unsigned)atoi(argv[2])};
        if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 1)) { perror("listen"); return 1; }
        printf("VSOCK-LISTENING %s\n", argv[2]);
        fflush(stdout);
        int c = accept(s, NULL, NULL);
        if (c < 0) { perror("accept"); return 1; }
        unsigned char len[8];
        for (size_t got = 0; got < sizeof len;) {
            ssize_t n = read(c, len + got, sizeof len - got);
            if (n <= 0) { perror("read length"); return 1; }
            got += (size_t)n;
        }
        long long size = 0;
        for (int i = 7; i >= 0; i--) size = size << 8 | len[i];
        int f = open(argv[3], O_CREAT | O_TRUNC | O_RDWR, 0644);
        if (f < 0 || copy_n(c, f, size)) return 1;
        lseek(f, 0, SEEK_SET);
        if (copy(f, c)) return 1;
        close(c);
        return 0;
    }
    if (argc == 4 && strcmp(argv[1], "send") == 0) {
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = (unsigned)atoi(argv[2]),
                                .svm_port = (unsigned)atoi(argv[3])};
        if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a)) { perror("connect"); return 1; }
        if (copy(0, s)) return 1;
        shutdown(s, SHUT_WR);
        return copy(s, 1) ? 1 : 0;
    }
    fprintf(stderr, "usage: vsock_helper echo PORT FILE | send CID PORT\n");
    return 2;
}
