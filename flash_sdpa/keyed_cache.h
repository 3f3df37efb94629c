// A process-wide map from a key to an object built once, safe to call from any thread: the Mac glue's pipeline cache
// (metal_launch.mm). Pure C++, so tests/objc_check/test_threads.py runs it from many threads under ThreadSanitizer.
//
// One mutex around lookup and build: a pipeline is compiled once however many threads ask for it at the same time
// (two Python threads running MPS ops at once have crashed inside caches without one, pytorch#197805). Values are
// never removed or replaced, so a value handed out stays valid after the lock is released.
#pragma once

#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

namespace flash_sdpa {

template <typename V>
class KeyedCache {
 public:
  // The value of `key`; the first caller builds it with build() under the lock. A null (false) result is returned
  // and not cached, so a failed build is retried, and reported, by every caller.
  template <typename Build>
  V get(const std::string& key, Build&& build) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = map_.find(key);
    if (it != map_.end()) {
      return it->second;
    }
    V value = std::forward<Build>(build)();
    if (value) {
      map_.emplace(key, value);
    }
    return value;
  }

 private:
  std::mutex mutex_;
  std::unordered_map<std::string, V> map_;
};

}  // namespace flash_sdpa
