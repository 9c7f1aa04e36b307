// A small least-recently-used cache of host-built launch data per (device, stream), shared by the
// CUDA kernels' metadata caches (cached_upload.cuh, lora_gram.cu's launch plans). Values are
// read-only once stored. An entry is replaced only by an insert from its own device and stream,
// so a device buffer it holds is freed after the kernels queued on that stream that read it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

namespace gradgeom {

template <typename Key, typename Value>
class StreamLru {
 public:
  explicit StreamLru(size_t capacity) : capacity_(capacity) {}

  // The value of the entry of (device, stream) whose key satisfies same(key), if any.
  template <typename Same>
  std::optional<Value> find(int device, int64_t stream, const Same& same) {
    const std::lock_guard<std::mutex> lock(mu_);
    for (Entry& e : entries_) {
      if (e.device == device && e.stream == stream && same(e.key)) {
        e.last_use = ++clock_;
        return e.value;
      }
    }
    return std::nullopt;
  }

  // Stores (key, value) for (device, stream): in a free slot, else in place of the least
  // recently used entry of the same device and stream; when there is none, not at all.
  void insert(int device, int64_t stream, Key key, Value value) {
    const std::lock_guard<std::mutex> lock(mu_);
    Entry entry{device, stream, std::move(key), std::move(value), ++clock_};
    if (entries_.size() < capacity_) {
      entries_.push_back(std::move(entry));
      return;
    }
    Entry* victim = nullptr;
    for (Entry& e : entries_)
      if (e.device == device && e.stream == stream && (victim == nullptr || e.last_use < victim->last_use)) victim = &e;
    if (victim != nullptr) *victim = std::move(entry);
  }

 private:
  struct Entry {
    int device;
    int64_t stream;
    Key key;
    Value value;
    uint64_t last_use;
  };
  size_t capacity_;
  std::mutex mu_;
  std::vector<Entry> entries_;
  uint64_t clock_ = 0;
};

}  // namespace gradgeom
