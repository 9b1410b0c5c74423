/* ratd status codes and element types shared by every public API (client, gpu).
 * One enum with stable values, as nng_err: fallible calls return it and write their
 * out-parameters only on success. ra_strerror() never returns NULL. */
#ifndef RATD_STATUS_H
#define RATD_STATUS_H

#ifdef __cplusplus
extern "C" {
#endif

typedef enum ra_status {
    RA_OK = 0,
    RA_EINVAL = 1,        /* an argument or a field is out of range or inconsistent */
    RA_ENOMEM = 2,        /* allocation failed or the daemon's memory limit was reached */
    RA_ETIMEDOUT = 3,     /* a wait ran past its timeout */
    RA_ENOSESSION = 4,    /* unknown session id */
    RA_ENOLAYER = 5,      /* layer index out of range */
    RA_ESHAPE = 6,        /* tensor shapes or sizes disagree with the session */
    RA_EPROTO = 7,        /* malformed message: garbage, truncated or missing frames */
    RA_EVERSION = 8,      /* protocol version mismatch */
    RA_ETOOBIG = 9,       /* a frame or a request exceeds a configured limit */
    RA_ECLOSED = 10,      /* the object was closed or the peer went away */
    RA_EIO = 11,          /* transport or file error */
    RA_EBUSY = 12,        /* the object is in use (e.g. a request already in flight) */
    RA_ENOTSUP = 13,      /* the operation or option is not supported */
    RA_ENONFINITE = 14,   /* NaN or Inf in input data */
    RA_EDEVICE = 15,      /* a device (CUDA) error; the message names it */
    RA_EINTERNAL = 16,    /* a bug: please report it */
    RA_EEXIST = 17,       /* the object already exists */
    RA_ESTATE = 18        /* the object is in the wrong state for this call */
} ra_status;

/* Element type of tensors on the wire and in storage. Values are stable (wire). */
typedef enum ra_dtype {
    RA_DTYPE_F32 = 0,
    RA_DTYPE_F16 = 1,
    RA_DTYPE_BF16 = 2
} ra_dtype;

/* Human-readable text for a status; a static string, never NULL. */
const char *ra_strerror(ra_status s);

/* Bytes per element of a dtype, 0 for an unknown value. */
unsigned ra_dtype_size(ra_dtype t);

/* "f32", "f16", "bf16", or "?" */
const char *ra_dtype_name(ra_dtype t);

#ifdef __cplusplus
}
#endif
#endif
