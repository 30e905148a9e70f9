/* Preloaded into Orthanc by infra/orthanc.py: Debian's Orthanc 1.10 has no bind-address
 * option and listens on every interface, so a wildcard bind() is turned into a loopback one.
 * infra/orthanc.py then checks in /proc/net/tcp that every listening socket is on 127.0.0.1. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static int (*real_bind)(int, const struct sockaddr *, socklen_t);
    if (!real_bind) real_bind = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
    if (addr && addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in v4;
        memcpy(&v4, addr, sizeof v4);
        if (v4.sin_addr.s_addr == htonl(INADDR_ANY)) v4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        return real_bind(fd, (const struct sockaddr *)&v4, sizeof v4);
    }
    if (addr && addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 v6;
        memcpy(&v6, addr, sizeof v6);
        if (!memcmp(&v6.sin6_addr, &in6addr_any, sizeof in6addr_any)) v6.sin6_addr = in6addr_loopback;
        return real_bind(fd, (const struct sockaddr *)&v6, sizeof v6);
    }
    return real_bind(fd, addr, len);
}
