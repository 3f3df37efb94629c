// Stub of Foundation: NSString, NSError, NSDictionary and the NS_ENUM macro, for compile checks on Linux.
// Declared from Apple's documentation (selector names and types as documented); nothing else.
#pragma once

#include <objc/NSObject.h>
#include <dispatch/dispatch.h>
#include <stdint.h>

#define NS_ENUM(_type, _name) enum _name : _type _name; enum _name : _type
#define NS_OPTIONS(_type, _name) enum _name : _type _name; enum _name : _type

#pragma clang assume_nonnull begin

@interface NSString : NSObject
+ (nullable instancetype)stringWithUTF8String:(const char*)nullTerminatedCString;
@property(nullable, readonly) const char* UTF8String;
@property(readonly) NSUInteger length;
@end

@interface NSError : NSObject
@property(readonly) NSInteger code;
@property(readonly, copy) NSString* localizedDescription;
@end

@interface NSDictionary<KeyType, ObjectType> : NSObject
@property(readonly) NSUInteger count;
@end

#pragma clang assume_nonnull end
