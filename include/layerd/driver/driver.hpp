// The graphdriver: Docker's fuse-overlayfs driver semantics on the io_uring loop. Every call is
// awaited on the loop thread; calls on one layer are serialized by a keyed lock, calls on
// different layers run concurrently. Failures throw layerd::Error with a message fit for the
// client (api/ sends it as {"Err": message}).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "layerd/archive/stream.hpp"
#include "layerd/core/metrics.hpp"
#include "layerd/core/task.hpp"

namespace layerd::driver {

struct IdMap {
  std::uint32_t container_id = 0;
  std::uint32_t host_id = 0;
  std::uint32_t size = 0;
};

struct InitRequest {
  std::string home;
  std::vector<std::string> options;
  std::vector<IdMap> uid_maps;
  std::vector<IdMap> gid_maps;
};

struct CreateRequest {
  std::string id;
  std::string parent;
  std::string mount_label;
  std::map<std::string, std::string> storage_opt;
  bool read_write = false;
};

using archive::Change;

struct LayerInfo {
  std::string id;
  std::string parent;
  bool mounted = false;
  int refcount = 0;
  pid_t server_pid = 0;  // 0 when no FUSE server runs for it
  std::string state;     // "unmounted", "mounted", "failed", ...
  std::string last_error;
};

// One line of /v1/events.
struct Event {
  double time = 0;            // seconds since the epoch
  std::string type;           // "mount", "unmount", "server-exit", "remount", "failure", ...
  std::string layer;
  std::string detail;
};

enum class HealPolicy { kRemount, kMarkFailed };

struct DriverConfig {
  std::string default_home = "/var/lib/layerd";
  std::string run_dir = "/run/layerd";
  std::string fuse_overlayfs = "fuse-overlayfs";  // resolved through PATH
  unsigned max_concurrent_spawns = 64;
  std::chrono::milliseconds mount_timeout{30'000};
  HealPolicy heal_policy = HealPolicy::kRemount;
  bool unmount_on_exit = false;
  // ApplyDiff limits and policy (see archive::ApplyOptions).
  std::uint64_t apply_max_entries = 10'000'000;
  std::uint64_t apply_max_bytes = 1ULL << 40;
  bool allow_device_nodes = true;
};

struct DriverMetrics {
  std::uint64_t mounts = 0;
  std::uint64_t unmounts = 0;
  std::uint64_t mount_failures = 0;
  std::uint64_t remounts = 0;
  core::LabeledCounter child_exits;  // label: reason="exit"|"signal"|"unexpected"
  core::Histogram mount_seconds;
  core::Histogram unmount_seconds;
};

class Driver {
 public:
  explicit Driver(DriverConfig config);
  ~Driver();
  Driver(const Driver&) = delete;
  Driver& operator=(const Driver&) = delete;

  // Reconciles with the run directory and the mount table (adopts live mounts, cleans leftovers).
  core::Task<void> start();
  // Stops background work (watchers, supervisors) and waits for it, at most `deadline` before
  // giving up waiting politely. With unmount_on_exit, unmounts every layer first. FUSE servers
  // otherwise keep running for the next layerd.
  core::Task<void> shutdown(std::chrono::milliseconds deadline = std::chrono::seconds(5));

  core::Task<void> init(InitRequest request);
  core::Task<void> create(CreateRequest request);
  core::Task<void> remove(std::string id);
  core::Task<std::string> get(std::string id, std::string mount_label);
  core::Task<void> put(std::string id);
  core::Task<bool> exists(std::string id);
  core::Task<std::map<std::string, std::string>> metadata(std::string id);
  core::Task<std::vector<std::pair<std::string, std::string>>> status();
  core::Task<void> cleanup();

  core::Task<std::uint64_t> apply_diff(std::string id, std::string parent,
                                       archive::ByteSource& tar);
  core::Task<void> diff(std::string id, std::string parent, archive::ByteSink& tar);
  core::Task<std::vector<Change>> changes(std::string id, std::string parent);
  core::Task<std::uint64_t> diff_size(std::string id, std::string parent);

  [[nodiscard]] std::vector<LayerInfo> layers() const;
  [[nodiscard]] const DriverMetrics& metrics() const noexcept;
  [[nodiscard]] std::size_t active_mounts() const noexcept;
  [[nodiscard]] const std::string& home() const noexcept;

  // Event subscribers are called on the loop thread for every event; the returned id removes
  // the subscription.
  using EventHandler = std::function<void(const Event&)>;
  std::uint64_t subscribe(EventHandler handler);
  void unsubscribe(std::uint64_t subscription);

 private:
  struct NaiveResult {
    std::vector<Change> changes;
    std::uint64_t size = 0;
  };
  core::Task<NaiveResult> naive_compare(const std::string& id, const std::string& parent,
                                        archive::ByteSink* export_to, bool want_size);
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace layerd::driver
