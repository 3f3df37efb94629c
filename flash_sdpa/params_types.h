// The scalar types of the params structs (varlen_params.h, backward_params.h, paged_params.h, attention_options.h),
// one spelling for MSL and host C++: every params header is compiled as both, and their static_asserts pin the
// layout on both sides.
#pragma once

#ifdef __METAL_VERSION__
#include <metal_stdlib>
typedef long fsdpa_i64;  // MSL long is 64-bit
typedef int fsdpa_i32;
typedef uint fsdpa_u32;
typedef float fsdpa_f32;
#ifndef FSDPA_CONSTANT
#define FSDPA_CONSTANT constant constexpr  // program-scope values live in the constant address space
#endif
#else
#include <cstddef>
#include <cstdint>
typedef int64_t fsdpa_i64;
typedef int32_t fsdpa_i32;
typedef uint32_t fsdpa_u32;
typedef float fsdpa_f32;
#ifndef FSDPA_CONSTANT
#define FSDPA_CONSTANT constexpr
#endif
#endif
