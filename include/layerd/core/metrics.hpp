// Plain counters and histograms that parts update and api/ renders in Prometheus text format.
// Single-threaded like the loop: no atomics.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <string>

namespace layerd::core {

class Histogram {
 public:
  // Upper bounds in seconds, from 100 us to 30 s: covers a health check and a 128-lower mount.
  static constexpr std::array<double, 14> kBounds = {0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                                                     0.005,  0.01,    0.025,  0.05,  0.1,
                                                     0.25,   1.0,     5.0,    30.0};
  void observe(double seconds) noexcept {
    for (std::size_t i = 0; i < kBounds.size(); ++i)
      if (seconds <= kBounds[i]) ++buckets_[i];
    ++count_;
    sum_ += seconds;
  }
  [[nodiscard]] std::uint64_t bucket(std::size_t i) const noexcept { return buckets_[i]; }
  [[nodiscard]] std::uint64_t count() const noexcept { return count_; }
  [[nodiscard]] double sum() const noexcept { return sum_; }

 private:
  std::array<std::uint64_t, kBounds.size()> buckets_{};  // cumulative, as Prometheus wants
  std::uint64_t count_ = 0;
  double sum_ = 0;
};

// Counters keyed by a label set rendered as `key="value",...`.
using LabeledCounter = std::map<std::string, std::uint64_t>;

}  // namespace layerd::core
