// Dropout mask shared by the forward and backward kernels (and mirrored bit for bit by the
// torch reference in server/backends/philox.py), so the backward pass regenerates exactly the
// mask the forward pass drew.
//
// Element (sequence b, query head h, query row i, key column j), rows and columns counted from
// the start of sequence b, draws from Philox4x32-10 with
//     counter = { j / 4, i, b * heads_q + h, offset_lo32 },  key = { seed_lo32, seed_hi32 }
// and takes component (j % 4) of the four outputs (x, y, z, w). The element is kept when that
// 32-bit value is below keep_threshold = min(floor((1 - p) * 2^32), 2^32 - 1).
#pragma once
#include <cstdint>
#include <curand_philox4x32_x.h>

namespace flashserve {

__host__ __device__ inline uint32_t dropout_keep_threshold(float p_drop) {
  double t = (1.0 - (double)p_drop) * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : (uint32_t)t;
}

// Four consecutive columns 4*col_group .. 4*col_group+3 of one row: bit t of the result is set
// when column 4*col_group+t is kept.
__device__ __forceinline__ uint32_t dropout_keep4(uint64_t seed, uint64_t offset, uint32_t seq_head,
                                                  uint32_t row, uint32_t col_group, uint32_t threshold) {
  uint4 c = make_uint4(col_group, row, seq_head, (uint32_t)offset);
  uint2 k = make_uint2((uint32_t)seed, (uint32_t)(seed >> 32));
  uint4 r = curand_Philox4x32_10(c, k);
  return (uint32_t)(r.x < threshold) | ((uint32_t)(r.y < threshold) << 1) |
         ((uint32_t)(r.z < threshold) << 2) | ((uint32_t)(r.w < threshold) << 3);
}

}  // namespace flashserve
