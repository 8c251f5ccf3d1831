/* A device-manager client inside a test guest, for lab/tests/test_upcall_lab.py (busybox has no AF_VSOCK).
 *
 *   upcall_probe FRAMES   connect to vsock CID 1 (loopback) port 219, send the service byte 'd', print the
 *                         Connect frame's header, then send each 1024-byte frame of FRAMES and print the
 *                         reply's header, ret and CPU index, one PROBE-REPLY line each; then, on a
 *                         second connection, send the first 100 bytes of a frame and report how many
 *                         bytes came back before the server closed it (PROBE-PARTIAL)
 *
 * Only a module built with -DKATA_UPCALL_PEER_CID=1 answers it (the shipped one answers the host only).
 * Built by the test with `gcc -static -O2`.
 */
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define FRAME 1024

static int read_full(int fd, unsigned char *buf, int len) {
    int done = 0;
    while (done < len) {
        int n = read(fd, buf + done, len - done);
        if (n <= 0) return done;
        done += n;
    }
    return done;
}

static int connect_service(void) {
    struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = 1, .svm_port = 219 };
    int sock = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof addr) || write(sock, "d", 1) != 1) {
        perror("upcall_probe");
        return -1;
    }
    return sock;
}

static uint32_t u32_at(const unsigned char *buf, int offset) {
    uint32_t value;
    memcpy(&value, buf + offset, sizeof value);
    return value;  /* x86-64: little-endian like the wire */
}

int main(int argc, char **argv) {
    unsigned char req[FRAME] = { 0 }, rep[FRAME];
    int frames, sock, n, i = 0;

    if (argc != 2) { fprintf(stderr, "usage: upcall_probe FRAMES\n"); return 2; }
    frames = open(argv[1], O_RDONLY);
    sock = connect_service();
    if (frames < 0 || sock < 0) { perror("upcall_probe"); return 1; }
    n = read_full(sock, rep, FRAME);
    printf("PROBE-CONNECT n=%d magic=%#x size=%u type=%u flags=%u\n", n, u32_at(rep, 0), u32_at(rep, 4),
           u32_at(rep, 8), u32_at(rep, 12));
    while (read_full(frames, req, FRAME) == FRAME) {
        if (write(sock, req, FRAME) != FRAME) { perror("write"); return 1; }
        n = read_full(sock, rep, FRAME);
        printf("PROBE-REPLY %d n=%d type=%u size=%u ret=%d index=%u\n", i++, n, u32_at(rep, 8),
               u32_at(rep, 4), (int32_t)u32_at(rep, 16), u32_at(rep, 20));
        fflush(stdout);
    }
    close(sock);
    sock = connect_service();
    if (sock < 0) return 1;
    n = read_full(sock, rep, FRAME);  /* Connect */
    if (write(sock, req, 100) != 100) { perror("write"); return 1; }
    n = read_full(sock, rep, FRAME);
    printf("PROBE-PARTIAL n=%d\n", n);
    return 0;
}
