// Fibers: a minimal user-space context switch for the emulator's GPU threads (x86-64 SysV and AArch64 AAPCS64).
//
// mcpu_switch(save, next) pushes the callee-saved registers and the floating-point control state (MXCSR + x87
// control word / FPCR: the flush-to-zero mode of a fast-math kernel is per fiber), stores the stack pointer in *save,
// switches to `next` and pops the same frame from it. mcpu_fiber_frame() builds the frame a new fiber starts from:
// its first switch "returns" into entry() with the caller's floating-point control state.
// Freestanding (no libc, no C++ library), so the AArch64 path can be compile-checked anywhere with clang --target.
// Included by runtime.cpp only: the switch is defined by top-level assembly.
#pragma once

#include <stddef.h>
#include <stdint.h>

extern "C" void mcpu_switch(void** save_sp, void* new_sp);

#if defined(__x86_64__)

// Frame (low to high): MXCSR (4 bytes) + x87 control word (2) in one 8-byte slot, r15 r14 r13 r12 rbx rbp, return.
__asm__(
    ".text\n.globl mcpu_switch\n.type mcpu_switch,@function\nmcpu_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  subq $8, %rsp\n  stmxcsr (%rsp)\n  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n  fldcw 4(%rsp)\n  addq $8, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n  ret\n"
    ".size mcpu_switch, .-mcpu_switch\n");

// `top`: 16-byte aligned end of the fiber's stack.
inline void* mcpu_fiber_frame(char* top, void (*entry)()) {
  uint64_t* sp = (uint64_t*)top;
  *--sp = 0;                              // fake return address of entry (it never returns)
  *--sp = (uint64_t)entry;                // popped by `ret` in mcpu_switch
  for (int r = 0; r < 6; ++r) *--sp = 0;  // rbp rbx r12..r15
  uint32_t mxcsr;
  uint16_t fpucw;
  __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
  __asm__ volatile("fnstcw %0" : "=m"(fpucw));
  --sp;
  __builtin_memcpy((char*)sp, &mxcsr, 4);
  __builtin_memcpy((char*)sp + 4, &fpucw, 2);
  return sp;
}

#elif defined(__aarch64__)

// Frame (176 bytes, low to high): x19..x28, x29 (frame pointer), x30 (link register: where `ret` goes), d8..d15,
// FPCR, padding to keep sp 16-byte aligned.
__asm__(
    ".text\n.globl mcpu_switch\n.type mcpu_switch,%function\nmcpu_switch:\n"
    "  sub sp, sp, #176\n"
    "  stp x19, x20, [sp, #0]\n  stp x21, x22, [sp, #16]\n  stp x23, x24, [sp, #32]\n"
    "  stp x25, x26, [sp, #48]\n  stp x27, x28, [sp, #64]\n  stp x29, x30, [sp, #80]\n"
    "  stp d8, d9, [sp, #96]\n  stp d10, d11, [sp, #112]\n  stp d12, d13, [sp, #128]\n  stp d14, d15, [sp, #144]\n"
    "  mrs x9, fpcr\n  str x9, [sp, #160]\n"
    "  mov x9, sp\n  str x9, [x0]\n  mov sp, x1\n"
    "  ldr x9, [sp, #160]\n  msr fpcr, x9\n"
    "  ldp d8, d9, [sp, #96]\n  ldp d10, d11, [sp, #112]\n  ldp d12, d13, [sp, #128]\n  ldp d14, d15, [sp, #144]\n"
    "  ldp x19, x20, [sp, #0]\n  ldp x21, x22, [sp, #16]\n  ldp x23, x24, [sp, #32]\n"
    "  ldp x25, x26, [sp, #48]\n  ldp x27, x28, [sp, #64]\n  ldp x29, x30, [sp, #80]\n"
    "  add sp, sp, #176\n  ret\n"
    ".size mcpu_switch, .-mcpu_switch\n");

inline void* mcpu_fiber_frame(char* top, void (*entry)()) {
  uint64_t* sp = (uint64_t*)(top - 176);
  for (int r = 0; r < 22; ++r) sp[r] = 0;  // x19..x29, d8..d15 (x29 = 0 ends frame-pointer walks)
  sp[11] = (uint64_t)entry;                // x30: `ret` jumps to entry
  uint64_t fpcr;
  __asm__ volatile("mrs %0, fpcr" : "=r"(fpcr));
  sp[20] = fpcr;
  sp[21] = 0;
  return sp;
}

#else
#error "metal_cpu runtime: fibers exist for x86-64 and AArch64 only"
#endif
