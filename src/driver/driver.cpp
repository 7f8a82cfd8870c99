// The graphdriver. Each call validates the id, takes the layer's key in the KeyedMutex (FIFO),
// then works on the store (layout), proc (FUSE servers, fusermount3) and watch (mount table,
// inotify). Mount state lives in `mounts_`; every change of it emits an event and updates metrics.
#include "layerd/driver/driver.hpp"

#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/inotify.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <filesystem>
#include <set>
#include <unordered_map>

#include "layerd/archive/archive.hpp"
#include "layerd/core/ops.hpp"
#include "layerd/core/scope.hpp"
#include "layerd/proc/child.hpp"
#include "layerd/store/store.hpp"
#include "layerd/sync/sync.hpp"
#include "layerd/sys/error.hpp"
#include "layerd/sys/fd.hpp"
#include "layerd/sys/syscalls.hpp"
#include "layerd/watch/watch.hpp"
#include "mount_options.hpp"
#include "runtime_state.hpp"

namespace layerd::driver {

namespace {

double wall_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

double seconds_since(core::Clock::time_point start) {
  return std::chrono::duration<double>(core::Clock::now() - start).count();
}

// Backing filesystem names for Status, as Docker prints them.
std::string filesystem_name(long magic) {
  switch (static_cast<unsigned long>(magic)) {
    case 0xEF53: return "extfs";
    case 0x01021994: return "tmpfs";
    case 0x58465342: return "xfs";
    case 0x9123683E: return "btrfs";
    case 0x794C7630: return "overlayfs";
    case 0x65735546: return "fuse";
    case 0x2FC12FC1: return "zfs";
    default: {
      char buf[32];
      std::snprintf(buf, sizeof buf, "0x%lx", static_cast<unsigned long>(magic));
      return buf;
    }
  }
}

// As Docker's userns.RunningInUserNS: the initial namespace maps all 2^32 ids onto themselves.
bool running_in_user_namespace() {
  std::string map;
  if (sys::read_small_file(AT_FDCWD, "/proc/self/uid_map", map, 4096) < 0) return false;
  unsigned long long inside = 0, outside = 0, count = 0;
  if (std::sscanf(map.c_str(), "%llu %llu %llu", &inside, &outside, &count) != 3) return false;
  return !(inside == 0 && outside == 0 && count == 4294967295ULL);
}

// fuse-overlayfs processes whose mountpoint (their last argument) lies under `prefix`, except
// `known` ones. Blocking /proc walk: run on the offload pool.
std::vector<pid_t> find_fuse_servers_under(const std::string& prefix,
                                           const std::vector<pid_t>& known) {
  std::vector<pid_t> found;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator("/proc", ec)) {
    const std::string name = entry.path().filename().string();
    if (name.empty() || !std::all_of(name.begin(), name.end(), ::isdigit)) continue;
    const pid_t pid = static_cast<pid_t>(std::stol(name));
    if (std::find(known.begin(), known.end(), pid) != known.end()) continue;
    std::string comm;
    if (sys::read_small_file(AT_FDCWD, (entry.path() / "comm").c_str(), comm, 256) < 0) continue;
    if (comm != "fuse-overlayfs\n") continue;
    std::string cmdline;
    if (sys::read_small_file(AT_FDCWD, (entry.path() / "cmdline").c_str(), cmdline, 1 << 16) < 0)
      continue;
    while (!cmdline.empty() && cmdline.back() == '\0') cmdline.pop_back();
    const std::string target = cmdline.substr(cmdline.rfind('\0') + 1);
    if (target.rfind(prefix, 0) == 0) found.push_back(pid);
  }
  return found;
}

}  // namespace

// A running fuse-overlayfs. Shared between the layer's mount state and the task that waits for
// its exit, so whichever lets go last frees it.
struct Server {
  explicit Server(proc::Child c) : child(std::move(c)) {}
  proc::Child child;
  long long start_time = 0;
  bool exited = false;
  std::optional<proc::ExitStatus> status;
  bool expected_exit = false;             // layerd is unmounting it
  sync::Event exit_event;
  core::CancelSource* readiness = nullptr;  // a mount waiting for it to become ready
  std::string log_path;
};

struct MountRuntime {
  int refcount = 0;
  bool mounted = false;
  bool failed = false;
  std::shared_ptr<Server> server;
  std::string options;
  std::string last_error;
  int inotify_wd = -1;
  int consecutive_failures = 0;
};

struct Driver::Impl {
  // The number of states with mounted set, kept as it changes: the health route reads it for
  // every probe, and a scan of 1,000 states per probe was 6% of the loop's time in a storm.
  std::size_t mounted_count = 0;
  void set_mounted(MountRuntime& state, bool mounted) noexcept {
    if (state.mounted == mounted) return;
    state.mounted = mounted;
    if (mounted) {
      ++mounted_count;
    } else {
      --mounted_count;
    }
  }

  explicit Impl(DriverConfig c)
      : config(std::move(c)), spawn_slots(std::max(1u, config.max_concurrent_spawns)) {}

  DriverConfig config;
  std::unique_ptr<store::Store> store;
  std::string home;  // canonical path of the store's home
  bool started = false;
  bool initialized = false;
  InitRequest init_request;
  sync::KeyedMutex locks;
  sync::Semaphore spawn_slots;
  watch::MountTable table;
  std::unique_ptr<watch::MountWatcher> watcher;
  std::unique_ptr<watch::InotifyWatcher> inotify;
  std::unordered_map<int, std::string> layer_of_watch;
  std::unordered_map<std::string, MountRuntime> mounts;
  // Every layer of the home and its parent ("" for a base layer), for /v1/layers and Status.
  std::map<std::string, std::string> catalog;
  std::unique_ptr<RuntimeState> runtime;
  core::Scope background;
  core::CancelSource stop;
  DriverMetrics metrics;
  std::map<std::uint64_t, EventHandler> subscribers;
  std::uint64_t next_subscription = 1;
  std::string fuse_overlayfs_version;

  // --- helpers ----------------------------------------------------------------------------------

  void emit(std::string type, const std::string& layer, std::string detail = {}) {
    Event event{wall_seconds(), std::move(type), layer, std::move(detail)};
    // Copy: a handler may unsubscribe itself.
    auto handlers = subscribers;
    for (auto& [id, handler] : handlers) handler(event);
  }

  std::string layer_dir(const std::string& id) const { return home + "/" + id; }
  std::string merged_dir(const std::string& id) const { return layer_dir(id) + "/merged"; }
  std::string diff_dir(const std::string& id) const { return layer_dir(id) + "/diff"; }

  void require_started() const {
    if (!started) throw Error(EAGAIN, "the driver is not started");
  }

  core::Task<store::LayerRecord> load_existing(const std::string& id) {
    co_return co_await store->load(id);
  }

  core::Task<void> open_home(const std::string& path) {
    auto next = std::make_unique<store::Store>(path);
    co_await next->open();
    (void)co_await next->repair();
    char resolved[PATH_MAX];
    if (::realpath(path.c_str(), resolved) == nullptr)
      throw Error(errno, "resolving the home " + path);
    store = std::move(next);
    if (watcher && !home.empty()) watcher->unwatch_prefix(home);
    home = resolved;
    if (watcher) watcher->watch_prefix(home);
    co_await rebuild_catalog();
  }

  // --- mounting ---------------------------------------------------------------------------------

  core::Task<void> mount(const std::string& id, const store::LayerRecord& record,
                         const std::string& mount_label);
  core::Task<void> unmount(const std::string& id, MountRuntime& state);
  core::Task<void> detach_dead_mount(const std::string& id);
  core::Task<bool> is_mount_point(const std::string& path);
  core::Task<void> supervise(std::string id, std::shared_ptr<Server> server);
  core::Task<void> heal(std::string id, std::string cause);
  core::Task<void> watch_mountpoint(std::string id, std::shared_ptr<Server> server);
  void unwatch_mountpoint(MountRuntime& state);
  core::Task<void> save_runtime(const std::string& id);
  core::Task<void> adopt_runtime_state();
  core::Task<void> rebuild_catalog();

  // --- diffs ------------------------------------------------------------------------------------

  // As the seed's isParent: `parent` is the layer's direct parent ("" for a base layer).
  core::Task<bool> is_direct_parent(const store::LayerRecord& record, const std::string& parent);
  core::Task<sys::UniqueFd> open_dir(const std::string& path);
  core::Task<std::vector<sys::UniqueFd>> open_lowers(const store::LayerRecord& record);
};

// --- mount / unmount -----------------------------------------------------------------------------

core::Task<void> Driver::Impl::mount(const std::string& id, const store::LayerRecord& record,
                                     const std::string& mount_label) {
  const auto started_at = core::Clock::now();
  const std::string merged = merged_dir(id);
  MountSpec spec{id, record.lowers, record.committed, mount_label};
  const std::string options = build_mount_options(spec);

  // 0700 as the seed creates it. EEXIST: left by an earlier mount or a crash.
  int res = co_await core::mkdirat(AT_FDCWD, merged.c_str(), 0700);
  if (res < 0 && res != -EEXIST) throw Error(res, "creating the mountpoint " + merged);

  // A stale mount left behind (a dead server from before a crash): get rid of it first.
  if (co_await is_mount_point(merged)) co_await detach_dead_mount(id);

  const std::string log_path = config.run_dir + "/logs/" + id + ".log";
  int opened = co_await core::openat(AT_FDCWD, log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                     0600);
  if (opened < 0) throw Error(opened, "opening the server log " + log_path);
  sys::UniqueFd log_fd(opened);

  proc::SpawnOptions spawn;
  spawn.argv = {config.fuse_overlayfs, "-f", "-o", options, merged};
  spawn.cwd = home;  // the options name paths relative to the home, as the seed's do
  spawn.new_session = true;  // outlives layerd; no controlling terminal, no shared signals
  spawn.stdout_mode = proc::Stdio::kFd;
  spawn.stderr_mode = proc::Stdio::kFd;
  spawn.stdout_fd = log_fd.get();
  spawn.stderr_fd = log_fd.get();

  auto slot = co_await spawn_slots.scoped(&stop);
  if (!slot) throw Error(ECANCELED, "layerd is shutting down");
  // posix_spawn waits for the child's exec: done on a worker so the loop keeps serving.
  std::optional<proc::Child> spawned;
  long long start_time = 0;
  try {
    // The start time (for adoption after a restart) is read there too: reading
    // /proc/PID/stat waits for the child's exec to finish with its memory map, which under
    // load takes milliseconds the loop must not spend.
    spawned.emplace(co_await core::offload([&spawn, &start_time] {
      proc::Child child = proc::Child::spawn(spawn);
      start_time = proc::process_start_time(child.pid());
      return child;
    }));
  } catch (const Error& e) {
    // Out of descriptors or processes lands here: an error for this Get, naming the layer.
    // EAGAIN from a spawn only ever means the latter, which strerror does not say.
    std::string hint = e.errno_value() == EAGAIN
                           ? " (no more processes: RLIMIT_NPROC, a pids cgroup or kernel.pid_max)"
                           : "";
    throw Error(e.errno_value(), "mounting layer " + id + ": " + e.context() + hint);
  }
  proc::Child child = std::move(*spawned);
  log_fd.reset();
  auto server = std::make_shared<Server>(std::move(child));
  server->log_path = log_path;
  server->start_time = start_time;

  core::CancelSource readiness;
  server->readiness = &readiness;
  background.spawn(supervise(id, server));
  bool mounted;
  {
    core::Deadline deadline(readiness, config.mount_timeout);
    mounted = co_await watcher->wait_mounted(merged, &readiness);
  }
  server->readiness = nullptr;
  slot.release();
  // Killed right after its mount appeared: supervise() saw the exit before this layer had a
  // state to heal, so the mount is dead and nobody would notice. Fail the mount instead.
  if (mounted && server->exited) mounted = false;

  if (!mounted) {
    ++metrics.mount_failures;
    std::string reason;
    if (server->exited) {
      std::string log;
      (void)sys::read_small_file(AT_FDCWD, log_path.c_str(), log, 64 * 1024);
      while (!log.empty() && (log.back() == '\n' || log.back() == ' ')) log.pop_back();
      if (log.size() > 4096) log = "..." + log.substr(log.size() - 4096);
      reason = "fuse-overlayfs " +
               (server->status ? server->status->describe() : std::string("exited")) + ": " +
               (log.empty() ? std::string("<stderr empty>") : log);
    } else {
      server->expected_exit = true;
      (void)server->child.signal(SIGKILL);
      (void)co_await server->exit_event.wait(nullptr);
      reason = stop.cancelled() ? "layerd is shutting down"
                                : "fuse-overlayfs did not mount within the timeout";
    }
    // The mount may have appeared before the server died: detach the dead mount, or it stays
    // behind (ENOTCONN, untracked) and the mountpoint cannot be removed.
    co_await table.refresh();
    if (table.is_mounted(merged)) {
      try {
        co_await detach_dead_mount(id);
      } catch (const Error&) {
        // Reported below with the mount's own failure; the next Get retries the detach.
      }
    }
    (void)co_await core::unlinkat(AT_FDCWD, merged.c_str(), AT_REMOVEDIR);
    emit("failure", id, "mount: " + reason);
    throw Error(EIO, "mounting layer " + id + ": " + reason);
  }

  MountRuntime& state = mounts[id];
  state.server = server;
  state.options = options;
  set_mounted(state, true);
  state.failed = false;
  state.last_error.clear();
  ++metrics.mounts;
  metrics.mount_seconds.observe(seconds_since(started_at));
  emit("mount", id, "pid " + std::to_string(server->child.pid()));
  co_await watch_mountpoint(id, server);
}

// One statx on the ring instead of re-reading the whole mount table, which in a storm of N
// mounts would make every mount cost O(N): the root of a mount carries STATX_ATTR_MOUNT_ROOT,
// and a mount whose FUSE server died answers ENOTCONN.
core::Task<bool> Driver::Impl::is_mount_point(const std::string& path) {
  struct statx st {};
  int res = co_await core::statx(AT_FDCWD, path.c_str(), AT_SYMLINK_NOFOLLOW, STATX_BASIC_STATS,
                                 &st);
  if (res == -ENOTCONN || res == -EIO) co_return true;
  if (res < 0) co_return false;
  co_return (st.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT) &&
      (st.stx_attributes & STATX_ATTR_MOUNT_ROOT);
}

// Lazily detaches a mount whose server is gone (or that is stuck), as the last resort of the
// seed's unmount sequence. syncfs and umount2 can block on a FUSE mount: done on a worker.
core::Task<void> Driver::Impl::detach_dead_mount(const std::string& id) {
  const std::string merged = merged_dir(id);
  int res = co_await core::offload([merged] {
    if (::umount2(merged.c_str(), MNT_DETACH) < 0) return -errno;
    return 0;
  });
  if (res < 0 && res != -EINVAL && res != -ENOENT)
    throw Error(res, "detaching the mount " + merged);
}

core::Task<void> Driver::Impl::unmount(const std::string& id, MountRuntime& state) {
  const auto started_at = core::Clock::now();
  const std::string merged = merged_dir(id);
  std::shared_ptr<Server> server = state.server;
  if (server) server->expected_exit = true;
  unwatch_mountpoint(state);

  bool unmounted = false;
  if (!co_await is_mount_point(merged)) {
    unmounted = true;
  } else {
    // What `fusermount3 -u` does after its checks, without starting a process (about 0.2 ms
    // against 1.3-1.6 ms; fusermount3 was a sixth of the machine's CPU in a storm): allowed
    // where layerd may unmount (root, or its own mount namespace when rootless); elsewhere it
    // fails with EPERM and the setuid helpers below do it. On a worker: an unmount syncs the
    // filesystem, which waits for the FUSE server.
    int res = co_await core::offload([merged] {
      return ::umount2(merged.c_str(), UMOUNT_NOFOLLOW) == 0 ? 0 : -errno;
    });
    unmounted = res == 0;
  }
  if (!unmounted) {
    for (const char* tool : {"fusermount3", "fusermount"}) {
      proc::SpawnOptions spawn;
      spawn.argv = {tool, "-u", merged};
      try {
        proc::RunResult result = co_await proc::run(spawn, std::chrono::seconds(10));
        if (result.status.success()) {
          unmounted = true;
          break;
        }
      } catch (const Error&) {
        // Not installed: try the next way.
      }
    }
  }
  if (!unmounted) {
    // Push pending writes to the upper directory before detaching, as the seed does.
    (void)co_await core::offload([merged] {
      sys::UniqueFd fd(::open(merged.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
      if (fd) (void)::syncfs(fd.get());
    });
    co_await detach_dead_mount(id);
  }

  if (server && !server->exited) {
    // fuse-overlayfs exits once its mount is gone; give it a moment, then make sure.
    core::CancelSource patience;
    bool exited;
    {
      core::Deadline deadline(patience, std::chrono::seconds(5));
      exited = co_await server->exit_event.wait(&patience);
    }
    if (!exited) {
      (void)server->child.signal(SIGKILL);
      (void)co_await server->exit_event.wait(nullptr);
    }
  }
  // Removing the mountpoint also drops copies of the mount in other namespaces (see the seed).
  (void)co_await core::unlinkat(AT_FDCWD, merged.c_str(), AT_REMOVEDIR);

  set_mounted(state, false);
  state.server.reset();
  ++metrics.unmounts;
  metrics.unmount_seconds.observe(seconds_since(started_at));
  emit("unmount", id);
}

// Waits for a FUSE server to exit; an exit layerd did not ask for starts healing at once.
core::Task<void> Driver::Impl::supervise(std::string id, std::shared_ptr<Server> server) {
  std::optional<proc::ExitStatus> status = co_await server->child.wait(&stop);
  if (!status) co_return;  // layerd is stopping; the server lives on
  server->exited = true;
  server->status = status;
  metrics.child_exits[std::string("reason=\"") +
                      (server->expected_exit ? "expected" : "unexpected") + "\""]++;
  if (server->readiness) server->readiness->cancel();
  server->exit_event.set();
  if (server->expected_exit) co_return;
  auto it = mounts.find(id);
  if (it == mounts.end() || it->second.server != server) co_return;  // still mounting: Get reports
  emit("server-exit", id, status->describe());
  co_await heal(id, "fuse-overlayfs " + status->describe());
}

// Brings a layer's mount back in line with reality after its server died or its mount vanished:
// the dead mount is detached and, while the layer is held, mounted again (policy permitting).
core::Task<void> Driver::Impl::heal(std::string id, std::string cause) {
  auto guard = co_await locks.lock(id, &stop);
  if (!guard) co_return;
  auto it = mounts.find(id);
  if (it == mounts.end() || !it->second.mounted) co_return;
  MountRuntime& state = it->second;
  // Re-check under the lock: another operation may have handled it already.
  co_await table.refresh();
  const bool server_alive = state.server && !state.server->exited;
  if (server_alive && table.is_mounted(merged_dir(id))) co_return;

  if (state.server) state.server->expected_exit = true;
  if (server_alive) {
    (void)state.server->child.signal(SIGKILL);
    (void)co_await state.server->exit_event.wait(nullptr);
  }
  unwatch_mountpoint(state);
  if (table.is_mounted(merged_dir(id))) co_await detach_dead_mount(id);
  set_mounted(state, false);
  state.server.reset();
  state.last_error = cause;

  if (state.refcount <= 0) {
    (void)co_await core::unlinkat(AT_FDCWD, merged_dir(id).c_str(), AT_REMOVEDIR);
    mounts.erase(it);
    emit("unmount", id, "behind layerd's back: " + cause);
    co_await save_runtime(id);
    co_return;
  }
  if (config.heal_policy == HealPolicy::kMarkFailed) {
    state.failed = true;
    emit("failure", id, cause + "; marked failed until the next Get");
    co_await save_runtime(id);
    co_return;
  }
  // Remount with backoff while it keeps dying: 0, 100 ms, 200 ms, 400 ms, then give up.
  for (int attempt = 0;; ++attempt) {
    if (attempt > 0) {
      (void)co_await core::sleep(std::chrono::milliseconds(100 << (attempt - 1))).cancel_on(stop);
      if (stop.cancelled()) co_return;
    }
    std::string error;
    try {
      store::LayerRecord record = co_await store->load(id);
      co_await mount(id, record, {});
    } catch (const Error& e) {
      error = e.what();
    }
    if (error.empty()) {
      MountRuntime& healed = mounts[id];
      ++metrics.remounts;
      healed.consecutive_failures = 0;
      emit("remount", id, "after " + cause);
      co_await save_runtime(id);
      co_return;
    }
    MountRuntime& failing = mounts[id];
    failing.last_error = error;
    if (++failing.consecutive_failures >= 4) {
      failing.failed = true;
      emit("failure", id, "remount failed, giving up: " + error);
      co_await save_runtime(id);
      co_return;
    }
  }
}

// inotify_add_watch resolves the mountpoint, which asks the FUSE server (a just-started one can
// be slow to answer in a storm): done on a worker, and the result kept only if the mount it
// watches is still the current one.
core::Task<void> Driver::Impl::watch_mountpoint(std::string id, std::shared_ptr<Server> server) {
  watch::InotifyWatcher* watcher = inotify.get();
  const std::string path = merged_dir(id);
  const int wd = co_await core::offload(
      [watcher, path] { return watcher->add(path, IN_UNMOUNT | IN_DELETE_SELF); });
  if (wd < 0) co_return;  // the mount table watcher still notices
  auto it = mounts.find(id);
  if (it != mounts.end() && it->second.inotify_wd == wd) co_return;  // same inode, same watch
  if (it == mounts.end() || !it->second.mounted || it->second.server != server ||
      it->second.inotify_wd >= 0) {
    inotify->remove(wd);
    co_return;
  }
  it->second.inotify_wd = wd;
  layer_of_watch[wd] = id;
}

void Driver::Impl::unwatch_mountpoint(MountRuntime& state) {
  if (state.inotify_wd < 0) return;
  layer_of_watch.erase(state.inotify_wd);
  inotify->remove(state.inotify_wd);
  state.inotify_wd = -1;
}

core::Task<void> Driver::Impl::save_runtime(const std::string& id) {
  if (!runtime) co_return;
  auto it = mounts.find(id);
  if (it == mounts.end() || (!it->second.mounted && it->second.refcount <= 0)) {
    co_await runtime->erase(home, id);
    co_return;
  }
  const MountRuntime& state = it->second;
  RuntimeRecord record;
  record.home = home;
  record.id = id;
  record.refcount = state.refcount;
  record.options = state.options;
  if (state.server && !state.server->exited) {
    record.server_pid = state.server->child.pid();
    record.server_start_time = state.server->start_time;
  }
  co_await runtime->save(record);
}

// After a restart: mounts whose server still runs (same pid and start time) are adopted with
// their refcounts; dead ones are detached and remounted if held; mounts under the home that no
// record explains are unmounted.
core::Task<void> Driver::Impl::adopt_runtime_state() {
  std::vector<RuntimeRecord> records = co_await runtime->load_all();
  co_await table.refresh();
  std::vector<std::string> held_dead;
  for (RuntimeRecord& record : records) {
    if (record.home != home) continue;
    if (!store::is_valid_id(record.id) || !co_await store->exists(record.id)) {
      co_await runtime->erase(home, record.id);
      continue;
    }
    const std::string merged = merged_dir(record.id);
    bool adopted = false;
    if (record.server_pid > 0 && table.is_mounted(merged)) {
      try {
        auto server = std::make_shared<Server>(
            proc::Child::adopt(record.server_pid, record.server_start_time));
        server->start_time = record.server_start_time;
        MountRuntime& state = mounts[record.id];
        state.refcount = record.refcount;
        state.server = server;
        state.options = record.options;
        set_mounted(state, true);
        background.spawn(supervise(record.id, server));
        co_await watch_mountpoint(record.id, server);
        emit("adopt", record.id, "pid " + std::to_string(record.server_pid));
        adopted = true;
      } catch (const Error&) {
        // Gone, or its pid now names another process: handled as dead below.
      }
    }
    if (adopted) continue;
    if (table.is_mounted(merged)) co_await detach_dead_mount(record.id);
    if (record.refcount > 0) {
      MountRuntime& state = mounts[record.id];
      state.refcount = record.refcount;
      held_dead.push_back(record.id);
    } else {
      (void)co_await core::unlinkat(AT_FDCWD, merged.c_str(), AT_REMOVEDIR);
      co_await runtime->erase(home, record.id);
    }
  }
  // FUSE servers serving a mountpoint under the home that no record explains: started by a
  // layerd that died before it recorded them (some may not even have mounted yet, and would
  // mount after this sweep). Nobody holds them: stop them first, then sweep their mounts.
  std::vector<pid_t> adopted_pids;
  for (const auto& [id, state] : mounts)
    if (state.server) adopted_pids.push_back(state.server->child.pid());
  std::vector<pid_t> strays = co_await core::offload(
      [prefix = home + "/", adopted_pids] { return find_fuse_servers_under(prefix, adopted_pids); });
  for (pid_t pid : strays) {
    try {
      proc::Child stray = proc::Child::adopt(pid);
      (void)stray.signal(SIGKILL);
      (void)co_await stray.wait(nullptr);
      emit("server-exit", "", "stopped unrecorded fuse-overlayfs pid " + std::to_string(pid));
    } catch (const Error&) {
      // Already gone.
    }
  }
  // Mounts under the home that no record explains: leftovers of a crash before the record was
  // written. Nobody holds them.
  co_await table.refresh();
  // Copied: the table's entries change (the watcher refreshes it) while this loop awaits.
  std::vector<std::string> points;
  for (const watch::MountEntry* entry : table.under(home)) points.push_back(entry->mount_point);
  for (const std::string& point : points) {
    if (point.size() < 8 || point.compare(point.size() - 7, 7, "/merged") != 0) continue;
    std::string id = point.substr(home.size() + 1, point.size() - home.size() - 8);
    if (mounts.count(id)) continue;
    co_await detach_dead_mount(id);
    (void)co_await core::unlinkat(AT_FDCWD, point.c_str(), AT_REMOVEDIR);
    emit("unmount", id, "stale mount found at start");
  }
  for (const std::string& id : held_dead) {
    try {
      store::LayerRecord layer = co_await store->load(id);
      co_await mount(id, layer, {});
      emit("remount", id, "server was gone after restart");
    } catch (const Error& e) {
      MountRuntime& state = mounts[id];
      state.failed = true;
      state.last_error = e.what();
      emit("failure", id, std::string("remount after restart: ") + e.what());
    }
    co_await save_runtime(id);
  }
}

// Reads every layer's link and lower once: the parent of a layer is the layer whose link id
// heads its lower chain.
core::Task<void> Driver::Impl::rebuild_catalog() {
  std::map<std::string, std::string> link_to_id;
  std::map<std::string, std::string> first_lower;
  for (const std::string& id : co_await store->list()) {
    store::LayerRecord record;
    try {
      record = co_await store->load(id);
    } catch (const Error&) {
      continue;  // a directory that is not a layer
    }
    if (!record.link_id.empty()) link_to_id[record.link_id] = id;
    first_lower[id] = record.lowers.empty() ? "" : record.lowers.front();
  }
  catalog.clear();
  const std::string prefix = std::string(store::kLinkDirName) + "/";
  for (const auto& [id, lower] : first_lower) {
    std::string parent;
    if (lower.rfind(prefix, 0) == 0) {
      auto it = link_to_id.find(lower.substr(prefix.size()));
      if (it != link_to_id.end()) parent = it->second;
    }
    catalog[id] = parent;
  }
}

// --- Driver ---------------------------------------------------------------------------------------

Driver::Driver(DriverConfig config) : impl_(std::make_unique<Impl>(std::move(config))) {}

Driver::~Driver() = default;

core::Task<void> Driver::start() {
  Impl& d = *impl_;
  int res = co_await core::mkdirat(AT_FDCWD, d.config.run_dir.c_str(), 0700);
  if (res < 0 && res != -EEXIST) throw Error(res, "creating the run directory " + d.config.run_dir);
  const std::string logs = d.config.run_dir + "/logs";
  res = co_await core::mkdirat(AT_FDCWD, logs.c_str(), 0700);
  if (res < 0 && res != -EEXIST) throw Error(res, "creating " + logs);
  // Rootless (a user namespace): no CAP_MKNOD, so device entries of a layer are skipped as
  // Docker skips them there.
  if (running_in_user_namespace()) d.config.allow_device_nodes = false;
  d.runtime = std::make_unique<RuntimeState>(d.config.run_dir);
  co_await d.runtime->open();
  // dockerd sends Init only when it starts, never to a plugin that restarted under it: come back
  // in the home the last Init chose (while it still exists), or every layer dockerd asks for
  // "does not exist" and the adopted mounts of that home are ignored.
  std::string home_to_open = d.config.default_home;
  const std::string last_home = co_await d.runtime->load_home();
  if (!last_home.empty()) {
    struct statx st {};
    int res = co_await core::statx(AT_FDCWD, last_home.c_str(), 0, STATX_TYPE, &st);
    if (res == 0 && S_ISDIR(st.stx_mode)) home_to_open = last_home;
  }
  co_await d.open_home(home_to_open);
  co_await d.table.refresh();
  d.watcher = std::make_unique<watch::MountWatcher>(d.table);
  d.watcher->watch_prefix(d.home);
  d.inotify = std::make_unique<watch::InotifyWatcher>();
  d.background.spawn(d.watcher->run(d.stop));
  d.background.spawn(d.inotify->run(d.stop, [&d](int wd, std::uint32_t mask) {
    auto it = d.layer_of_watch.find(wd);
    if (it == d.layer_of_watch.end()) return;
    std::string id = it->second;
    // The watch is gone with the mount (IN_IGNORED follows): forget it now.
    if (mask & (IN_UNMOUNT | IN_DELETE_SELF | IN_IGNORED)) {
      d.layer_of_watch.erase(it);
      auto state = d.mounts.find(id);
      if (state != d.mounts.end() && state->second.inotify_wd == wd) state->second.inotify_wd = -1;
      d.background.spawn(d.heal(id, (mask & IN_DELETE_SELF) ? "mountpoint removed"
                                                            : "unmounted behind layerd's back"));
    }
  }));
  d.watcher->on_unmount([&d](const std::string& mount_point) {
    if (mount_point.size() <= d.home.size() + 8) return;
    if (mount_point.compare(0, d.home.size() + 1, d.home + "/") != 0) return;
    std::string id =
        mount_point.substr(d.home.size() + 1, mount_point.size() - d.home.size() - 8);
    auto state = d.mounts.find(id);
    if (state == d.mounts.end() || !state->second.mounted) return;
    d.background.spawn(d.heal(id, "unmounted behind layerd's back"));
  });
  {
    proc::SpawnOptions version;
    version.argv = {d.config.fuse_overlayfs, "--version"};
    version.stdout_mode = proc::Stdio::kCapture;
    try {
      proc::RunResult result = co_await proc::run(version, std::chrono::seconds(5));
      const std::string text = result.stdout_text + result.stderr_text;
      auto pos = text.find("fuse-overlayfs: version ");
      if (pos != std::string::npos) {
        auto start = pos + 24;
        d.fuse_overlayfs_version = text.substr(start, text.find('\n', start) - start);
      }
    } catch (const Error&) {
      d.fuse_overlayfs_version = "not found";
    }
  }
  d.started = true;
  co_await d.adopt_runtime_state();
}

core::Task<void> Driver::shutdown(std::chrono::milliseconds deadline) {
  Impl& d = *impl_;
  if (d.config.unmount_on_exit && d.started) co_await cleanup();
  d.stop.cancel();
  if (!co_await d.background.join_for(deadline)) {
    // Whatever is still running holds nothing the kernel needs: the loop is going away, and the
    // FUSE servers are detached children that keep serving.
    (void)co_await d.background.join();
  }
}

core::Task<void> Driver::init(InitRequest request) {
  Impl& d = *impl_;
  d.require_started();
  if (request.home.empty()) request.home = d.config.default_home;
  if (request.home.front() != '/')
    throw Error(EINVAL, "the home must be an absolute path: " + request.home);
  char resolved[PATH_MAX];
  std::string wanted = request.home;
  if (::realpath(request.home.c_str(), resolved) != nullptr) wanted = resolved;
  if (wanted != d.home) {
    std::size_t active = 0;
    for (const auto& [id, state] : d.mounts)
      if (state.mounted || state.refcount > 0) ++active;
    if (active > 0)
      throw Error(EBUSY, "cannot switch the home to " + request.home + ": " +
                             std::to_string(active) + " layers of " + d.home +
                             " are still mounted");
    co_await d.open_home(request.home);
  }
  co_await d.runtime->save_home(d.home);
  d.init_request = std::move(request);
  d.initialized = true;
}

core::Task<void> Driver::create(CreateRequest request) {
  Impl& d = *impl_;
  d.require_started();
  if (!request.storage_opt.empty()) throw Error(EINVAL, "--storage-opt is not supported");
  store::validate_id(request.id);
  if (!request.parent.empty()) store::validate_id(request.parent);
  if (request.parent == request.id) throw Error(EINVAL, "a layer cannot be its own parent");
  // The parent's key too (create marks it committed, and it must not be removed half-way).
  // Keys are taken in one global order so two creates naming each other cannot deadlock.
  sync::KeyedMutex::Guard first, second;
  if (request.parent.empty()) {
    first = co_await d.locks.lock(request.id);
  } else {
    const bool child_first = request.id < request.parent;
    first = co_await d.locks.lock(child_first ? request.id : request.parent);
    second = co_await d.locks.lock(child_first ? request.parent : request.id);
  }
  (void)co_await d.store->create(request.id, request.parent);
  d.catalog[request.id] = request.parent;
}

core::Task<void> Driver::remove(std::string id) {
  Impl& d = *impl_;
  d.require_started();
  store::validate_id(id);
  auto guard = co_await d.locks.lock(id);
  auto it = d.mounts.find(id);
  if (it != d.mounts.end()) {
    if (it->second.mounted) {
      d.emit("unmount", id, "removed while mounted (refcount " +
                                std::to_string(it->second.refcount) + "): unmounting first");
      co_await d.unmount(id, it->second);
    }
    d.mounts.erase(id);
    co_await d.save_runtime(id);
  }
  // Removing a layer that is not there succeeds, as with the seed (dockerd's clean-up paths
  // remove layers whose creation failed).
  if (co_await d.store->exists(id)) co_await d.store->remove(id);
  d.catalog.erase(id);
}

core::Task<std::string> Driver::get(std::string id, std::string mount_label) {
  Impl& d = *impl_;
  d.require_started();
  store::validate_id(id);
  auto guard = co_await d.locks.lock(id);
  store::LayerRecord record = co_await d.load_existing(id);
  // A layer without lowers has nothing to mount: its diff is the whole tree.
  if (record.lowers.empty()) co_return d.diff_dir(id);

  MountRuntime& state = d.mounts[id];
  if (state.mounted) {
    ++state.refcount;
    co_await d.save_runtime(id);
    co_return d.merged_dir(id);
  }
  std::exception_ptr failure;
  try {
    co_await d.mount(id, record, mount_label);
  } catch (...) {
    failure = std::current_exception();
  }
  if (failure) {
    auto again = d.mounts.find(id);
    if (again != d.mounts.end() && !again->second.mounted && again->second.refcount <= 0) {
      d.mounts.erase(again);
      // The mountpoint made for this attempt (a failed spawn leaves it behind).
      (void)co_await core::unlinkat(AT_FDCWD, d.merged_dir(id).c_str(), AT_REMOVEDIR);
    }
    std::rethrow_exception(failure);
  }
  MountRuntime& mounted = d.mounts[id];
  ++mounted.refcount;
  co_await d.save_runtime(id);
  co_return d.merged_dir(id);
}

core::Task<void> Driver::put(std::string id) {
  Impl& d = *impl_;
  d.require_started();
  store::validate_id(id);
  auto guard = co_await d.locks.lock(id);
  store::LayerRecord record = co_await d.load_existing(id);
  if (record.lowers.empty()) co_return;
  auto it = d.mounts.find(id);
  // An extra Put is harmless, as in the seed.
  if (it == d.mounts.end()) co_return;
  MountRuntime& state = it->second;
  if (state.refcount > 0) --state.refcount;
  if (state.refcount > 0) {
    co_await d.save_runtime(id);
    co_return;
  }
  if (state.mounted) co_await d.unmount(id, state);
  d.mounts.erase(id);
  co_await d.save_runtime(id);
}

core::Task<bool> Driver::exists(std::string id) {
  Impl& d = *impl_;
  d.require_started();
  try {
    store::validate_id(id);
  } catch (const Error&) {
    co_return false;  // an id that cannot name a layer names none
  }
  co_return co_await d.store->exists(id);
}

core::Task<std::map<std::string, std::string>> Driver::metadata(std::string id) {
  Impl& d = *impl_;
  d.require_started();
  store::validate_id(id);
  auto guard = co_await d.locks.lock(id);
  store::LayerRecord record = co_await d.load_existing(id);
  const std::string dir = d.layer_dir(id);
  std::map<std::string, std::string> meta{
      {"WorkDir", dir + "/work"}, {"MergedDir", dir + "/merged"}, {"UpperDir", dir + "/diff"}};
  // LowerDir: each lower's link resolved to its absolute diff directory, as the seed reports it.
  // Up to 128 readlinks: on a worker.
  const std::string lower_dirs = co_await core::offload([home = d.home, lowers = record.lowers, id] {
    std::string out;
    for (const std::string& lower : lowers) {
      char target[PATH_MAX];
      const std::string link = home + "/" + lower;
      ssize_t n = ::readlink(link.c_str(), target, sizeof target - 1);
      if (n < 0) throw Error(errno, "layer " + id + ": reading the lower link " + link);
      target[n] = '\0';
      std::string resolved = home + "/l/" + target;
      // "HOME/l/../ID/diff" -> "HOME/ID/diff"
      const std::string up = home + "/l/../";
      if (resolved.compare(0, up.size(), up) == 0) resolved = home + "/" + resolved.substr(up.size());
      if (!out.empty()) out += ':';
      out += resolved;
    }
    return out;
  });
  if (!lower_dirs.empty()) meta["LowerDir"] = lower_dirs;
  co_return meta;
}

core::Task<std::vector<std::pair<std::string, std::string>>> Driver::status() {
  Impl& d = *impl_;
  d.require_started();
  const std::string backing = co_await core::offload([home = d.home] {
    struct statfs fs {};
    return ::statfs(home.c_str(), &fs) == 0 ? filesystem_name(fs.f_type) : std::string("unknown");
  });
  std::size_t failed = 0;
  for (const auto& [id, state] : d.mounts) failed += state.failed ? 1 : 0;
  co_return std::vector<std::pair<std::string, std::string>>{
      {"Home", d.home},
      {"Backing Filesystem", backing},
      {"Layers", std::to_string(d.catalog.size())},
      {"Active Mounts", std::to_string(active_mounts())},
      {"Failed Mounts", std::to_string(failed)},
      {"fuse-overlayfs", d.fuse_overlayfs_version},
  };
}

core::Task<void> Driver::cleanup() {
  Impl& d = *impl_;
  d.require_started();
  // By default mounts stay up for the next user (a restarting dockerd keeps its containers'
  // rootfs); --unmount-on-exit makes Cleanup unmount everything, as the seed's does.
  if (!d.config.unmount_on_exit) co_return;
  std::vector<std::string> ids;
  for (const auto& [id, state] : d.mounts) ids.push_back(id);
  for (const std::string& id : ids) {
    auto guard = co_await d.locks.lock(id);
    auto it = d.mounts.find(id);
    if (it == d.mounts.end()) continue;
    if (it->second.mounted) co_await d.unmount(id, it->second);
    d.mounts.erase(id);
    co_await d.save_runtime(id);
  }
}


// --- diffs -----------------------------------------------------------------------------------------

core::Task<bool> Driver::Impl::is_direct_parent(const store::LayerRecord& record,
                                                const std::string& parent) {
  if (parent.empty()) co_return record.lowers.empty();
  if (record.lowers.empty()) co_return false;
  if (!store::is_valid_id(parent) || !co_await store->exists(parent)) co_return false;
  store::LayerRecord parent_record = co_await store->load(parent);
  co_return record.lowers.front() == std::string(store::kLinkDirName) + "/" + parent_record.link_id;
}

core::Task<sys::UniqueFd> Driver::Impl::open_dir(const std::string& path) {
  int fd = co_await core::openat(AT_FDCWD, path.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW);
  if (fd < 0) throw Error(fd, "opening " + path);
  co_return sys::UniqueFd(fd);
}

core::Task<std::vector<sys::UniqueFd>> Driver::Impl::open_lowers(const store::LayerRecord& record) {
  std::vector<sys::UniqueFd> fds;
  // The lowers are HOME/l/LINK, layerd's own symlinks to ../ID/diff (the short names that keep
  // fuse-overlayfs's lowerdir option short): followed here, unlike open_dir() does.
  for (const std::string& path : store->lower_paths(record)) {
    int fd = co_await core::openat(AT_FDCWD, path.c_str(), O_RDONLY | O_DIRECTORY);
    if (fd < 0) throw Error(fd, "opening the lower directory " + path);
    fds.emplace_back(fd);
  }
  co_return fds;
}

namespace {

std::vector<int> raw_fds(const std::vector<sys::UniqueFd>& fds) {
  std::vector<int> out;
  for (const auto& fd : fds) out.push_back(fd.get());
  return out;
}

// Sum of the regular-file sizes a change list carries, as moby's ChangesSize counts them
// (hardlinked inodes once).
std::uint64_t changes_size(const std::string& root, const std::vector<Change>& changes) {
  std::uint64_t size = 0;
  std::set<std::pair<dev_t, ino_t>> seen;
  for (const Change& change : changes) {
    if (change.kind == Change::kDeleted) continue;
    struct stat st {};
    if (::lstat((root + change.path).c_str(), &st) != 0) continue;
    if (!S_ISREG(st.st_mode) && !S_ISLNK(st.st_mode)) continue;
    if (st.st_nlink > 1 && !seen.insert({st.st_dev, st.st_ino}).second) continue;
    size += static_cast<std::uint64_t>(st.st_size);
  }
  return size;
}

}  // namespace

// The seed's naive path, for a parent that is not the direct one: both trees mounted and
// compared in full. Get/Put take the layers' locks themselves.

core::Task<std::uint64_t> Driver::apply_diff(std::string id, std::string parent,
                                             archive::ByteSource& tar) {
  Impl& d = *impl_;
  d.require_started();
  store::validate_id(id);
  auto guard = co_await d.locks.lock(id);
  store::LayerRecord record = co_await d.load_existing(id);
  if (!co_await d.is_direct_parent(record, parent))
    throw Error(EINVAL, "ApplyDiff of layer " + id + ": \"" + parent +
                            "\" is not its parent; layerd applies a diff only onto its direct "
                            "parent");
  auto mounted = d.mounts.find(id);
  if (mounted != d.mounts.end() && mounted->second.mounted)
    throw Error(EBUSY, "ApplyDiff of layer " + id + ": the layer is mounted");
  const bool empty = co_await core::offload([dir = d.diff_dir(id)] {
    std::error_code ec;
    return std::filesystem::is_empty(dir, ec) && !ec;
  });
  if (!empty)
    throw Error(EEXIST, "ApplyDiff of layer " + id +
                            ": the layer already has content; a diff is applied to a fresh layer");

  archive::ApplyOptions options;
  for (const IdMap& m : d.init_request.uid_maps)
    options.uid_maps.push_back({m.container_id, m.host_id, m.size});
  for (const IdMap& m : d.init_request.gid_maps)
    options.gid_maps.push_back({m.container_id, m.host_id, m.size});
  options.max_entries = d.config.apply_max_entries;
  options.max_bytes = d.config.apply_max_bytes;
  // Device nodes need CAP_MKNOD: skipped in a user namespace (rootless), as Docker does.
  options.allow_device_nodes = d.config.allow_device_nodes;

  const std::string staging = co_await d.store->make_staging_dir(id);
  std::string error;
  int error_code = EIO;
  archive::ApplyResult result;
  try {
    sys::UniqueFd target = co_await d.open_dir(staging);
    result = co_await archive::apply_tar(tar, target.get(), options);
  } catch (const Error& e) {
    error = e.what();
    error_code = e.errno_value();
  }
  if (!error.empty()) {
    co_await d.store->discard_staging_dir(staging);
    throw Error(error_code, "ApplyDiff of layer " + id + ": " + error);
  }
  co_await d.store->replace_diff(id, staging);
  d.emit("apply", id, std::to_string(result.bytes_applied) + " bytes");
  co_return result.bytes_applied;
}

core::Task<void> Driver::diff(std::string id, std::string parent, archive::ByteSink& tar) {
  Impl& d = *impl_;
  d.require_started();
  store::validate_id(id);
  store::LayerRecord record;
  bool direct;
  {
    auto guard = co_await d.locks.lock(id);
    record = co_await d.load_existing(id);
    direct = co_await d.is_direct_parent(record, parent);
  }
  if (direct) {
    // Only the upper directory: what changed in this layer, whatever its size underneath.
    sys::UniqueFd upper = co_await d.open_dir(d.diff_dir(id));
    co_await archive::export_diff(upper.get(), tar);
    co_return;
  }
  (void)co_await naive_compare(id, parent, &tar, false);
}

core::Task<std::vector<Change>> Driver::changes(std::string id, std::string parent) {
  Impl& d = *impl_;
  d.require_started();
  store::validate_id(id);
  std::optional<std::vector<Change>> native;
  {
    auto guard = co_await d.locks.lock(id);
    store::LayerRecord record = co_await d.load_existing(id);
    if (co_await d.is_direct_parent(record, parent)) {
      sys::UniqueFd upper = co_await d.open_dir(d.diff_dir(id));
      std::vector<sys::UniqueFd> lowers = co_await d.open_lowers(record);
      native = co_await archive::upper_changes(upper.get(), raw_fds(lowers));
    }
  }
  if (native) co_return std::move(*native);
  NaiveResult naive = co_await naive_compare(id, parent, nullptr, false);
  co_return std::move(naive.changes);
}

core::Task<std::uint64_t> Driver::diff_size(std::string id, std::string parent) {
  Impl& d = *impl_;
  d.require_started();
  store::validate_id(id);
  {
    auto guard = co_await d.locks.lock(id);
    store::LayerRecord record = co_await d.load_existing(id);
    if (co_await d.is_direct_parent(record, parent)) {
      sys::UniqueFd upper = co_await d.open_dir(d.diff_dir(id));
      co_return co_await archive::upper_diff_size(upper.get());
    }
  }
  NaiveResult naive = co_await naive_compare(id, parent, nullptr, true);
  co_return naive.size;
}

// The seed's naive path, for a parent that is not the layer's direct one: both trees mounted
// (Get and Put take the layers' locks themselves) and compared in full; then, as asked, the
// changes exported as a tar and their size summed. Both mounts are released whatever happens.
core::Task<Driver::NaiveResult> Driver::naive_compare(const std::string& id,
                                                      const std::string& parent,
                                                      archive::ByteSink* export_to,
                                                      bool want_size) {
  Impl& d = *impl_;
  const std::string top = co_await get(id, "");
  std::string base;
  NaiveResult result;
  std::exception_ptr failure;
  try {
    if (!parent.empty()) base = co_await get(parent, "");
    sys::UniqueFd top_fd = co_await d.open_dir(top);
    sys::UniqueFd base_fd;
    if (!base.empty()) base_fd = co_await d.open_dir(base);
    result.changes = co_await archive::compare_trees(top_fd.get(), base_fd.get());
    if (export_to) co_await archive::export_changes(top_fd.get(), result.changes, *export_to);
    if (want_size) {
      const std::vector<Change>& changes = result.changes;
      result.size =
          co_await core::offload([&top, &changes] { return changes_size(top, changes); });
    }
  } catch (...) {
    failure = std::current_exception();
  }
  co_await put(id);
  if (!base.empty()) co_await put(parent);
  if (failure) std::rethrow_exception(failure);
  co_return result;
}

std::vector<LayerInfo> Driver::layers() const {
  const Impl& d = *impl_;
  std::vector<LayerInfo> out;
  auto describe = [&d](const std::string& id, const std::string& parent) {
    LayerInfo info;
    info.id = id;
    info.parent = parent;
    auto it = d.mounts.find(id);
    if (it == d.mounts.end()) {
      info.state = "unmounted";
      return info;
    }
    const MountRuntime& state = it->second;
    info.mounted = state.mounted;
    info.refcount = state.refcount;
    info.server_pid = state.server && !state.server->exited ? state.server->child.pid() : 0;
    info.state = state.failed ? "failed" : state.mounted ? "mounted" : "unmounted";
    info.last_error = state.last_error;
    return info;
  };
  for (const auto& [id, parent] : d.catalog) out.push_back(describe(id, parent));
  // Mount state of a layer the catalog does not know (removed behind layerd's back).
  for (const auto& [id, state] : d.mounts)
    if (!d.catalog.count(id)) out.push_back(describe(id, ""));
  std::sort(out.begin(), out.end(),
            [](const LayerInfo& a, const LayerInfo& b) { return a.id < b.id; });
  return out;
}

const DriverMetrics& Driver::metrics() const noexcept { return impl_->metrics; }

std::size_t Driver::active_mounts() const noexcept { return impl_->mounted_count; }

const std::string& Driver::home() const noexcept {
  return impl_->home.empty() ? impl_->config.default_home : impl_->home;
}

std::uint64_t Driver::subscribe(EventHandler handler) {
  std::uint64_t id = impl_->next_subscription++;
  impl_->subscribers.emplace(id, std::move(handler));
  return id;
}

void Driver::unsubscribe(std::uint64_t subscription) { impl_->subscribers.erase(subscription); }

}  // namespace layerd::driver
