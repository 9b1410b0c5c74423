/* The CUDA backend's stand-in for builds without CUDA (the "interface plus stub"
 * pattern): the front end and every caller link the same symbols either way, and a
 * cache asked for the CUDA backend fails cleanly with RA_ENOTSUP. */
#include "ra_gpu_internal.h"

int ra_gpu_cuda_probe(void)
{
    return 0;
}

void *ra_gpu_cuda_host_alloc(size_t bytes)
{
    return NULL;
}

int ra_gpu_cuda_host_free(void *p)
{
    return 0;
}

static ra_status stub_init(ra_gpu_cache *c)
{
    return ra_gpu_fail(c, RA_ENOTSUP, "this build of ratd has no CUDA backend");
}

static void stub_fini(ra_gpu_cache *c)
{
}

const ra_gpu_ops ra_gpu_cuda_ops = {
    .name = "cuda-stub",
    .init = stub_init,
    .fini = stub_fini,
};
