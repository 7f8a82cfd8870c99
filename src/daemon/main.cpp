// layerd: flags and config file, logging, resource limits, signals, start-up and shutdown.
// Everything else lives in the parts; this is the only place that logs errors.
#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#ifdef LAYERD_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

#include "layerd/api/server.hpp"
#include "layerd/core/loop.hpp"
#include "layerd/core/ops.hpp"
#include "layerd/core/scope.hpp"
#include "layerd/core/signals.hpp"
#include "layerd/driver/driver.hpp"
#include "layerd/sys/error.hpp"
#include "layerd/sys/fd.hpp"

namespace {

using namespace layerd;

constexpr const char* kDockerPluginSocket = "/run/docker/plugins/layerd.sock";

struct Options {
  std::string root = "/var/lib/layerd";
  std::string socket = "/run/layerd/layerd.sock";
  std::string run_dir = "/run/layerd";
  std::string log_level = "info";
  std::string log_format = "text";
  std::string socket_group;
  std::vector<uid_t> allow_uids;
  std::vector<gid_t> allow_gids;
  std::vector<std::string> docker_plugin_socket;  // empty value: the default path
  bool docker_plugin = false;
  std::size_t max_header_bytes = 16 * 1024;
  std::size_t max_json_bytes = 1024 * 1024;
  std::size_t max_connections = 4096;
  double idle_timeout = 60;
  double slow_client_timeout = 30;
  double shutdown_grace = 0.5;
  unsigned max_concurrent_spawns = 64;
  int loop_nice = -10;
  double mount_timeout = 30;
  std::string heal_policy = "remount";
  bool unmount_on_exit = false;
  std::string fuse_overlayfs = "fuse-overlayfs";
};

std::chrono::milliseconds seconds_to_ms(double s) {
  return std::chrono::milliseconds(static_cast<long long>(s * 1000.0));
}

// The message of a JSON log line, escaped as a JSON string body.
class JsonMessageFlag final : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& msg, const std::tm&,
              spdlog::memory_buf_t& dest) override {
    for (char c : std::string_view(msg.payload.data(), msg.payload.size())) {
      switch (c) {
        case '"': dest.append(std::string_view("\\\"")); break;
        case '\\': dest.append(std::string_view("\\\\")); break;
        case '\n': dest.append(std::string_view("\\n")); break;
        case '\r': dest.append(std::string_view("\\r")); break;
        case '\t': dest.append(std::string_view("\\t")); break;
        default:
          if (static_cast<unsigned char>(c) < 0x20) {
            fmt::format_to(std::back_inserter(dest), "\\u{:04x}", static_cast<int>(c));
          } else {
            dest.push_back(c);
          }
      }
    }
  }
  [[nodiscard]] std::unique_ptr<custom_flag_formatter> clone() const override {
    return std::make_unique<JsonMessageFlag>();
  }
};

void setup_logging(const Options& o) {
  auto logger = spdlog::stderr_color_mt("layerd");
  spdlog::set_default_logger(logger);
  spdlog::set_level(spdlog::level::from_str(o.log_level));
  if (o.log_format == "json") {
    auto formatter = std::make_unique<spdlog::pattern_formatter>();
    formatter->add_flag<JsonMessageFlag>('*').set_pattern(
        R"({"time":"%Y-%m-%dT%H:%M:%S.%e%z","level":"%l","pid":%P,"msg":"%*"})");
    spdlog::set_formatter(std::move(formatter));
  } else {
    spdlog::set_pattern("%Y-%m-%d %H:%M:%S.%e %^%l%$ %v");
  }
  spdlog::flush_on(spdlog::level::info);
}

// Thousands of connections and mounts each hold descriptors: use all the hard limit allows.
void raise_nofile_limit() {
  rlimit limit{};
  if (::getrlimit(RLIMIT_NOFILE, &limit) != 0) return;
  if (limit.rlim_cur >= limit.rlim_max) return;
  rlim_t wanted = limit.rlim_max;
  limit.rlim_cur = wanted;
  if (::setrlimit(RLIMIT_NOFILE, &limit) != 0)
    spdlog::warn("could not raise the open file limit to {}: {}", wanted,
                 errno_message(errno));
}

// The loop thread answers every client; in a mount storm it competes for the CPUs with the
// FUSE servers it starts (and on a 2-CPU host waited up to 40 ms for one). A lower niceness for
// that thread alone puts it ahead; the offload workers reset theirs (LoopOptions::worker_nice),
// so the servers they spawn keep the process's. Returns the process's niceness.
int raise_loop_priority(int loop_nice) {
  errno = 0;
  int base = ::getpriority(PRIO_PROCESS, 0);
  if (base == -1 && errno != 0) base = 0;
  if (loop_nice == base) return base;
  if (::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), loop_nice) != 0) {
    // Unprivileged (rootless): the loop runs at the process's niceness.
    spdlog::info("event loop thread left at niceness {} (setting {} failed: {})", base,
                 loop_nice, errno_message(errno));
  }
  return base;
}

// The kernel grows a process's descriptor table by doubling, and in a multi-threaded process
// each growth waits for an RCU grace period (synchronize_rcu in expand_files): the loop slept
// in accept for milliseconds at each doubling of a 1,000-connection storm. Growing it once now,
// while layerd has one thread and no waiting is needed, avoids that up to this size.
constexpr int kPresizedDescriptors = 16384;

void presize_fd_table() {
  rlimit limit{};
  if (::getrlimit(RLIMIT_NOFILE, &limit) != 0 || limit.rlim_cur < 2) return;
  int top = static_cast<int>(std::min<rlim_t>(limit.rlim_cur, kPresizedDescriptors)) - 1;
  sys::UniqueFd null_fd(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  if (!null_fd) return;
  // The lowest free descriptor at or above `top`: the table grows to hold it; closed at once.
  sys::UniqueFd high(::fcntl(null_fd.get(), F_DUPFD_CLOEXEC, top));
}

void notify(const char* state) {
#ifdef LAYERD_HAVE_SYSTEMD
  (void)sd_notify(0, state);
#else
  (void)state;
#endif
}

core::Task<void> run_server(api::Server& server, bool* joined) {
  *joined = co_await server.run();
}

core::Task<int> run_daemon(driver::Driver& driver, api::Server& server,
                           core::SignalSet& signals) {
  co_await driver.start();
  // The home can differ from --root: after a restart layerd returns to the home of the last
  // Init (dockerd does not send Init again to a plugin that restarts under it).
  spdlog::info("layer home {} ({} active mounts adopted)", driver.home(), driver.active_mounts());
  server.listen();
  bool joined = true;
  core::Scope scope;
  scope.spawn(run_server(server, &joined));
  for (const auto& path : server.config().socket_paths) spdlog::info("listening on {}", path);
  notify("READY=1");

  int sig = co_await signals.next();
  if (sig > 0) {
    spdlog::info("received {}, shutting down", ::strsignal(sig));
  } else {
    spdlog::error("waiting for signals failed: {}; shutting down", errno_message(sig));
  }
  notify("STOPPING=1");
  server.stop();
  (void)co_await scope.join();
  if (!joined) co_return 2;
  // Background work (watchers, supervisors) stops; FUSE servers keep running for the next
  // layerd unless --unmount-on-exit, which unmounts first and may take longer.
  co_await driver.shutdown(std::chrono::milliseconds(300));
  co_return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"layerd: supervises fuse-overlayfs layer mounts for Docker's graphdriver plugin "
               "protocol",
               "layerd"};
  app.set_version_flag("--version", std::string("layerd ") + LAYERD_VERSION);
  app.set_config("--config", "", "Read options from a TOML or INI file");
  app.add_option("--root", o.root, "Default data root (dockerd's Init passes its own home)")
      ->capture_default_str();
  app.add_option("--socket", o.socket, "Control socket path")->capture_default_str();
  app.add_option("--run-dir", o.run_dir, "Runtime state directory (tmpfs)")->capture_default_str();
  app.add_option("--log-level", o.log_level, "trace, debug, info, warn, error or critical")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "critical", "off"}))
      ->capture_default_str();
  app.add_option("--log-format", o.log_format, "text or json")
      ->check(CLI::IsMember({"text", "json"}))
      ->capture_default_str();
  app.add_option("--socket-group", o.socket_group, "Group (name or gid) owning the sockets");
  app.add_option("--allow-uid", o.allow_uids, "Also accept clients with this uid (repeatable)");
  app.add_option("--allow-gid", o.allow_gids, "Also accept clients with this gid (repeatable)");
  auto* plugin_opt = app.add_option(
      "--docker-plugin-socket", o.docker_plugin_socket,
      std::string("Also listen on a Docker plugin socket (no value: ") + kDockerPluginSocket + ")");
  plugin_opt->expected(0, 1);
  app.add_flag("--docker-plugin", o.docker_plugin,
               std::string("Same as --docker-plugin-socket ") + kDockerPluginSocket);
  app.add_option("--max-header-bytes", o.max_header_bytes, "Largest request head")
      ->capture_default_str();
  app.add_option("--max-json-bytes", o.max_json_bytes, "Largest JSON request body")
      ->capture_default_str();
  app.add_option("--max-connections", o.max_connections, "Most open client connections")
      ->capture_default_str();
  app.add_option("--idle-timeout", o.idle_timeout, "Seconds a connection may idle between requests")
      ->capture_default_str();
  app.add_option("--slow-client-timeout", o.slow_client_timeout,
                 "Seconds allowed for a request head, and for each step of body or answer")
      ->capture_default_str();
  app.add_option("--shutdown-grace", o.shutdown_grace,
                 "Seconds requests in flight get to finish at shutdown")
      ->capture_default_str();
  app.add_option("--max-concurrent-spawns", o.max_concurrent_spawns,
                 "Most fuse-overlayfs processes starting at once")
      ->capture_default_str();
  app.add_option("--loop-nice", o.loop_nice,
                 "Niceness of the event loop's thread alone (-20..19): below the FUSE servers' "
                 "so clients are answered promptly in a mount storm; needs CAP_SYS_NICE to go "
                 "below the process's, else left unchanged")
      ->check(CLI::Range(-20, 19))
      ->capture_default_str();
  app.add_option("--mount-timeout", o.mount_timeout, "Seconds a mount may take")
      ->capture_default_str();
  app.add_option("--heal-policy", o.heal_policy,
                 "remount: remount a dead mount still in use; fail: mark it failed")
      ->check(CLI::IsMember({"remount", "fail"}))
      ->capture_default_str();
  app.add_flag("--unmount-on-exit", o.unmount_on_exit,
               "Unmount every layer when layerd exits (default: mounts survive a restart)");
  app.add_option("--fuse-overlayfs", o.fuse_overlayfs, "fuse-overlayfs binary")
      ->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  setup_logging(o);
  raise_nofile_limit();
  presize_fd_table();
  // Replies to clients that went away must fail with EPIPE, not kill the daemon.
  (void)std::signal(SIGPIPE, SIG_IGN);

  driver::DriverConfig driver_config;
  driver_config.default_home = o.root;
  driver_config.run_dir = o.run_dir;
  driver_config.fuse_overlayfs = o.fuse_overlayfs;
  driver_config.max_concurrent_spawns = o.max_concurrent_spawns;
  driver_config.mount_timeout = seconds_to_ms(o.mount_timeout);
  driver_config.heal_policy =
      o.heal_policy == "fail" ? driver::HealPolicy::kMarkFailed : driver::HealPolicy::kRemount;
  driver_config.unmount_on_exit = o.unmount_on_exit;

  api::ServerConfig server_config;
  server_config.socket_paths = {o.socket};
  if (plugin_opt->count() > 0 || o.docker_plugin) {
    std::string path = o.docker_plugin_socket.empty() || o.docker_plugin_socket.front().empty()
                           ? kDockerPluginSocket
                           : o.docker_plugin_socket.front();
    server_config.socket_paths.push_back(path);
  }
  server_config.socket_group = o.socket_group;
  server_config.allow_uids = o.allow_uids;
  server_config.allow_gids = o.allow_gids;
  server_config.max_header_bytes = o.max_header_bytes;
  server_config.max_json_bytes = o.max_json_bytes;
  server_config.max_connections = o.max_connections;
  server_config.idle_timeout = seconds_to_ms(o.idle_timeout);
  server_config.slow_client_timeout = seconds_to_ms(o.slow_client_timeout);
  server_config.shutdown_grace = seconds_to_ms(o.shutdown_grace);

  try {
    // Blocked before the loop starts its worker threads, so they inherit the mask and the
    // signals reach only the signalfd.
    core::SignalSet signals{SIGTERM, SIGINT};
    core::LoopOptions loop_options;
    loop_options.worker_nice = raise_loop_priority(o.loop_nice);
    core::Loop loop(loop_options);
    driver::Driver driver(driver_config);
    api::Server server(driver, server_config);
    // The driver reports what happens to mounts as events; this is where they become log lines.
    // Routine mounts and unmounts are debug (a storm is thousands); whatever an operator should
    // see (healing, adoption, failures, unmounts layerd did not ask for) is info or warn.
    driver.subscribe([](const driver::Event& e) {
      const std::string layer = e.layer.empty() ? std::string("-") : e.layer;
      if (e.type == "failure" || e.type == "server-exit") {
        spdlog::warn("layer {}: {}: {}", layer, e.type, e.detail);
      } else if (e.type == "remount" || e.type == "adopt" ||
                 (e.type == "unmount" && !e.detail.empty())) {
        spdlog::info("layer {}: {}: {}", layer, e.type, e.detail);
      } else {
        spdlog::debug("layer {}: {}{}{}", layer, e.type, e.detail.empty() ? "" : ": ", e.detail);
      }
    });
    spdlog::info("layerd {} starting (default root {}, run dir {})", LAYERD_VERSION, o.root,
                 o.run_dir);
    int rc = loop.block_on(run_daemon(driver, server, signals));
    if (rc == 2) {
      // A request is stuck in a driver call: its frame still uses the server and the driver,
      // so they cannot be destroyed. The sockets are already removed; leave at once.
      spdlog::warn("requests were still running at shutdown; exiting without waiting for them");
      spdlog::shutdown();
      ::_exit(0);
    }
    spdlog::info("layerd stopped");
    return 0;
  } catch (const std::exception& e) {
    spdlog::critical("{}", e.what());
    return 1;
  }
}
