/* lars._udploop: the agent's API receive loop (Agent._serve_datagrams) in C.

   The same loop as the pure-Python one in lars/roles/agent.py, which stays the reference
   and the fallback: wait for a datagram on any API port, answer it with the Python
   handler, then poll every port for the next one for a while (yielding the CPU between
   polls) before blocking again. What C saves is the interpreter's work around the system
   calls (the poll results, the receive's tuple, the clock, the exception of an empty
   receive) and the interpreter lock while it waits or polls: the agent's trio thread runs
   meanwhile.

   serve(socks, handle, local_only, poll_budget, reply_budget, skip_first, skip_max,
         stopping, foreign, dropped, stop_check)
     socks        list of bound UDP socket objects (non-blocking is not needed)
     handle       handle(data: bytes, address: (str, int), sock) -> bytes | None
     local_only   list of bools: that port answers only 127/8 (others go to foreign)
     poll_budget  seconds to poll after a datagram that got no answer
     reply_budget seconds to poll after an answer
     skip_first, skip_max   after a poll after an answer ran out, answer skip_first
                  requests without polling, doubled per further miss up to skip_max
     stopping     callable: True once the loop must return (checked at least every
                  stop_check seconds, and after every datagram)
     foreign      foreign(address): a datagram from outside 127/8 on a loopback port
     dropped      dropped(): a reply the kernel refused (the client's buffer full, gone)
   Returns None when stopping() says so; raises OSError when a socket fails (ECONNREFUSED
   and EINTR from a receive are ignored, as in the Python loop). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define MAX_PORTS 64
#define RECEIVE_SIZE 65536

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

typedef struct {
    int n;
    struct pollfd fds[MAX_PORTS];
    int current;
    char *buffer;
    struct sockaddr_storage from;
    socklen_t fromlen;
    ssize_t size;
} Ports;

/* The first ready port after the last one read (a busy port does not starve the others);
   -1 if none is ready. */
static int ready_port(Ports *p) {
    int first = -1;
    for (int i = 0; i < p->n; i++) {
        if (p->fds[i].revents) {
            if (first < 0) first = i;
            if (i > p->current) return i;
        }
    }
    return first;
}

/* Receive from port i without waiting: 1 got one, 0 nothing there (or an ignorable
   error), -1 a socket error (errno set). */
static int receive_from(Ports *p, int i) {
    p->fromlen = sizeof p->from;
    ssize_t size = recvfrom(p->fds[i].fd, p->buffer, RECEIVE_SIZE, MSG_DONTWAIT,
                            (struct sockaddr *)&p->from, &p->fromlen);
    if (size < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNREFUSED || errno == EINTR)
            return 0;
        return -1;
    }
    p->size = size;
    p->current = i;
    return 1;
}

/* poll() every port for up to timeout_ms (0: just look); 1 got a datagram, 0 none, -1 an
   error. Called without the interpreter lock. */
static int wait_any(Ports *p, int timeout_ms) {
    int ready = poll(p->fds, p->n, timeout_ms);
    if (ready < 0) return errno == EINTR ? 0 : -1;
    if (ready == 0) return 0;
    for (int tries = 0; tries < p->n; tries++) {
        int i = ready_port(p);
        if (i < 0) return 0;
        int got = receive_from(p, i);
        if (got != 0) return got;
        p->fds[i].revents = 0; /* nothing after all: look at the next ready one */
    }
    return 0;
}

static PyObject *address_of(Ports *p) {
    char text[INET6_ADDRSTRLEN];
    if (p->from.ss_family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)&p->from;
        inet_ntop(AF_INET, &a->sin_addr, text, sizeof text);
        return Py_BuildValue("(si)", text, ntohs(a->sin_port));
    }
    if (p->from.ss_family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&p->from;
        inet_ntop(AF_INET6, &a->sin6_addr, text, sizeof text);
        return Py_BuildValue("(siII)", text, ntohs(a->sin6_port), ntohl(a->sin6_flowinfo),
                             a->sin6_scope_id);
    }
    PyErr_SetString(PyExc_OSError, "a datagram from an address family the agent does not serve");
    return NULL;
}

static int is_loopback(Ports *p) {
    if (p->from.ss_family == AF_INET) {
        return (ntohl(((struct sockaddr_in *)&p->from)->sin_addr.s_addr) >> 24) == 127;
    }
    if (p->from.ss_family == AF_INET6) {
        struct in6_addr *a = &((struct sockaddr_in6 *)&p->from)->sin6_addr;
        return IN6_IS_ADDR_LOOPBACK(a)
               || (IN6_IS_ADDR_V4MAPPED(a) && a->s6_addr[12] == 127);
    }
    return 0;
}

static int truthy_call(PyObject *callable) {
    PyObject *result = PyObject_CallNoArgs(callable);
    if (result == NULL) return -1;
    int truth = PyObject_IsTrue(result);
    Py_DECREF(result);
    return truth;
}

static PyObject *serve(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *socks, *handle, *local_only, *stopping, *foreign, *dropped;
    double poll_budget, reply_budget, stop_check;
    unsigned skip_first, skip_max;
    if (!PyArg_ParseTuple(args, "O!OO!ddIIOOOd", &PyList_Type, &socks, &handle, &PyList_Type,
                          &local_only, &poll_budget, &reply_budget, &skip_first, &skip_max,
                          &stopping, &foreign, &dropped, &stop_check))
        return NULL;
    Ports p;
    memset(&p, 0, sizeof p);
    p.n = (int)PyList_GET_SIZE(socks);
    if (p.n < 1 || p.n > MAX_PORTS || PyList_GET_SIZE(local_only) != p.n) {
        PyErr_SetString(PyExc_ValueError, "serve() needs 1 to 64 sockets and a local_only each");
        return NULL;
    }
    int local[MAX_PORTS];
    for (int i = 0; i < p.n; i++) {
        PyObject *fileno = PyObject_CallMethod(PyList_GET_ITEM(socks, i), "fileno", NULL);
        if (fileno == NULL) return NULL;
        p.fds[i].fd = (int)PyLong_AsLong(fileno);
        Py_DECREF(fileno);
        if (p.fds[i].fd < 0) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_OSError, "a closed socket");
            return NULL;
        }
        p.fds[i].events = POLLIN;
        local[i] = PyObject_IsTrue(PyList_GET_ITEM(local_only, i));
    }
    p.buffer = PyMem_RawMalloc(RECEIVE_SIZE);
    if (p.buffer == NULL) return PyErr_NoMemory();
    int wait_ms = (int)(stop_check * 1000);
    unsigned skip = 0, misses = 0;
    PyObject *result = NULL;
    for (;;) {
        int stop = truthy_call(stopping);
        if (stop != 0) {
            if (stop > 0) result = Py_NewRef(Py_None);
            break;
        }
        int got;
        Py_BEGIN_ALLOW_THREADS
        got = wait_any(&p, wait_ms);
        Py_END_ALLOW_THREADS
        if (got < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            break;
        }
        if (PyErr_CheckSignals() < 0) break;
        if (got == 0) continue;
        int failed = 0;
        while (got > 0) {
            PyObject *reply = NULL, *address = address_of(&p);
            if (address == NULL) {
                failed = 1;
                break;
            }
            int index = p.current;
            struct sockaddr_storage to = p.from;
            socklen_t tolen = p.fromlen;
            if (local[index] && !is_loopback(&p)) {
                reply = PyObject_CallOneArg(foreign, address);
                if (reply == NULL) {
                    failed = 1;
                } else { /* no answer to a foreign datagram */
                    Py_SETREF(reply, Py_NewRef(Py_None));
                }
            } else {
                PyObject *data = PyBytes_FromStringAndSize(p.buffer, p.size);
                if (data != NULL) {
                    reply = PyObject_CallFunctionObjArgs(handle, data, address,
                                                         PyList_GET_ITEM(socks, index), NULL);
                    Py_DECREF(data);
                }
                if (reply == NULL) failed = 1;
            }
            Py_DECREF(address);
            if (failed) break;
            double budget = poll_budget;
            if (reply != Py_None) {
                char *bytes;
                Py_ssize_t length;
                if (PyBytes_AsStringAndSize(reply, &bytes, &length) < 0) {
                    Py_DECREF(reply);
                    failed = 1;
                    break;
                }
                budget = reply_budget;
                ssize_t sent;
                Py_BEGIN_ALLOW_THREADS
                sent = sendto(p.fds[index].fd, bytes, length, MSG_DONTWAIT,
                              (struct sockaddr *)&to, tolen);
                Py_END_ALLOW_THREADS
                if (sent < 0) {
                    PyObject *none = PyObject_CallNoArgs(dropped);
                    Py_XDECREF(none);
                    if (none == NULL) {
                        Py_DECREF(reply);
                        failed = 1;
                        break;
                    }
                }
                if (skip) {
                    skip--;
                    budget = 0;
                }
            }
            int answered = reply != Py_None;
            Py_XDECREF(reply);
            if (budget <= 0) break;
            stop = truthy_call(stopping);
            if (stop != 0) {
                failed = stop < 0;
                got = 0;
                break;
            }
            Py_BEGIN_ALLOW_THREADS
            double until = now() + budget;
            for (;;) {
                got = wait_any(&p, 0);
                if (got != 0 || now() >= until) break;
                sched_yield();
            }
            Py_END_ALLOW_THREADS
            if (got < 0) {
                PyErr_SetFromErrno(PyExc_OSError);
                failed = 1;
                break;
            }
            if (answered) {
                if (got) {
                    misses = 0;
                } else {
                    misses++;
                    unsigned shift = misses - 1 < 16 ? misses - 1 : 16;
                    unsigned wanted = skip_first << shift;
                    skip = wanted < skip_max && (wanted >> shift) == skip_first ? wanted : skip_max;
                }
            }
        }
        if (failed) break;
    }
    PyMem_RawFree(p.buffer);
    return result;
}

static PyMethodDef methods[] = {
    {"serve", serve, METH_VARARGS, "The agent's API receive loop (see the module's source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "lars._udploop", "The agent's API receive loop in C.", -1, methods,
};

PyMODINIT_FUNC PyInit__udploop(void) { return PyModule_Create(&module); }
