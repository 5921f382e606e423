// How freed memory goes back to the OS (glibc's malloc).
//
// A training step frees and allocates the same activation buffers every step.
// By default glibc gives blocks above its mmap threshold back to the OS with
// munmap, and trims the top of its heaps, so the next step page-faults the same
// memory in again. On the 2-vCPU dev VM that was 3.8 k minor faults per step of
// the mini dense model and 7.6 k of mini Granular, and 11–14 % of a step's CPU
// samples in the kernel's fault path (docs/performance.md, session 14).
//
// keep_freed_memory() raises the mmap threshold to glibc's largest (32 MiB) and
// the trim threshold to 1 GiB: freed blocks stay in the process for the next
// step. Peak RSS is about the same (it is set by the step's live tensors), and
// nothing is returned to the OS before the process ends.
//
// Off with MOECPT_KEEP_FREED_MEMORY=0. Left alone when GLIBC_TUNABLES already
// sets a glibc.malloc tunable (the user's choice wins) and outside glibc.
// Returns whether it changed the policy. Call it once, early in main().
#pragma once

namespace moecpt {

bool keep_freed_memory();

// Whether keep_freed_memory() changed the policy in this process.
bool keeping_freed_memory();

}  // namespace moecpt
