/* Text for ra_status codes and facts about ra_dtype: the one place they live, so
 * every room (client, gpu, daemon, index) prints the same words. */
#include "ratd/status.h"

const char *ra_strerror(ra_status s)
{
    switch (s) {
    case RA_OK: return "ok";
    case RA_EINVAL: return "invalid argument";
    case RA_ENOMEM: return "out of memory or over the memory limit";
    case RA_ETIMEDOUT: return "timed out";
    case RA_ENOSESSION: return "unknown session";
    case RA_ENOLAYER: return "layer out of range";
    case RA_ESHAPE: return "shape mismatch";
    case RA_EPROTO: return "protocol error (malformed message)";
    case RA_EVERSION: return "protocol version mismatch";
    case RA_ETOOBIG: return "message or frame too large";
    case RA_ECLOSED: return "closed";
    case RA_EIO: return "I/O error";
    case RA_EBUSY: return "busy";
    case RA_ENOTSUP: return "not supported";
    case RA_ENONFINITE: return "NaN or Inf in input";
    case RA_EDEVICE: return "device error";
    case RA_EINTERNAL: return "internal error";
    case RA_EEXIST: return "already exists";
    case RA_ESTATE: return "wrong state";
    }
    return "unknown status";
}

unsigned ra_dtype_size(ra_dtype t)
{
    switch (t) {
    case RA_DTYPE_F32: return 4;
    case RA_DTYPE_F16: return 2;
    case RA_DTYPE_BF16: return 2;
    }
    return 0;
}

const char *ra_dtype_name(ra_dtype t)
{
    switch (t) {
    case RA_DTYPE_F32: return "f32";
    case RA_DTYPE_F16: return "f16";
    case RA_DTYPE_BF16: return "bf16";
    }
    return "?";
}
