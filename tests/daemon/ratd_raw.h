/* For the integration tests that speak the wire protocol by hand (after cmocka.h and
 * ratd_harness.h): a DEALER socket on a test daemon. */
#ifndef RATD_RAW_H
#define RATD_RAW_H

#include <zmq.h>

/* A DEALER connected to d: no linger, an unlimited send queue, a receive queue of
 * rcvhwm messages (0: unlimited; 1: a client that reads as little as it can). */
__attribute__((unused)) static void *ratd_raw_dealer(void *ctx, const ratd_proc *d, int rcvhwm)
{
    void *s = zmq_socket(ctx, ZMQ_DEALER);
    int linger = 0, zero = 0;
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(s, ZMQ_SNDHWM, &zero, sizeof zero);
    zmq_setsockopt(s, ZMQ_RCVHWM, &rcvhwm, sizeof rcvhwm);
    assert_int_equal(zmq_connect(s, d->endpoint), 0);
    return s;
}

#endif
