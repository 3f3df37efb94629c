// Stub of the Objective-C runtime base types, for compile checks on Linux (see ../../README.md).
// Declared from Apple's documentation; only what the glue and PyTorch's MPS headers use.
#pragma once

#if !defined(__OBJC__)
#error "objc/objc.h stub: compile as Objective-C++ (-x objective-c++)"
#endif

// arm64 macOS: BOOL is bool.
typedef bool BOOL;
#define YES true
#define NO false

#ifdef __cplusplus
#define nil nullptr
#else
#define nil ((void*)0)
#endif
