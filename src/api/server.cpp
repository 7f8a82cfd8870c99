#include <grp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <filesystem>
#include <optional>

#include <nlohmann/json.hpp>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "internal.hpp"

namespace layerd::api {

namespace {

// Resolves a group name or a numeric gid.
gid_t resolve_group(const std::string& group) {
  gid_t gid = 0;
  auto [end, ec] = std::from_chars(group.data(), group.data() + group.size(), gid);
  if (ec == std::errc() && end == group.data() + group.size()) return gid;
  std::vector<char> buf(16 * 1024);
  struct group entry {};
  struct group* found = nullptr;
  int res;
  while ((res = ::getgrnam_r(group.c_str(), &entry, buf.data(), buf.size(), &found)) == ERANGE &&
         buf.size() < (1u << 20))
    buf.resize(buf.size() * 2);
  if (res != 0) throw Error(res, "looking up socket group " + group);
  if (found == nullptr) throw Error(ENOENT, "socket group " + group + " does not exist");
  return found->gr_gid;
}

sockaddr_un unix_address(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof addr.sun_path)
    throw Error(ENAMETOOLONG, "socket path " + path + " is empty or longer than " +
                                  std::to_string(sizeof addr.sun_path - 1) + " bytes");
  std::memcpy(addr.sun_path, path.data(), path.size());
  return addr;
}

// A socket file left by a server that is gone is replaced; one that still answers is not.
void remove_stale_socket(const std::string& path, const sockaddr_un& addr) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return;
  if (!S_ISSOCK(st.st_mode))
    throw Error(EEXIST, "socket path " + path + " exists and is not a socket");
  sys::UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!probe) throw Error(errno, "socket");
  if (::connect(probe.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0)
    throw Error(EADDRINUSE, "another server is listening on " + path);
  if (::unlink(path.c_str()) != 0 && errno != ENOENT)
    throw Error(errno, "removing stale socket " + path);
}

core::Task<void> serve_connection(Server::Impl* server, sys::UniqueFd fd) {
  {
    Connection connection(*server, std::move(fd));
    co_await connection.run();
  }
  --server->stats.open_connections;
}

core::Task<void> accept_loop(Server::Impl* server, int listen_fd) {
  static const std::string kBusy = [] {
    std::string body = json_error("too many connections to layerd");
    return fmt::format(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        "Content-Length: {}\r\nConnection: close\r\n\r\n{}",
        body.size(), body);
  }();
  while (!server->stopping) {
    int res = co_await core::accept(listen_fd).cancel_on(server->accept_cancel);
    if (res == -ECANCELED || server->stopping) {
      if (res >= 0) (void)::close(res);
      break;
    }
    if (res < 0) {
      // Out of descriptors or memory: wait a little instead of spinning; the listen backlog
      // holds the clients meanwhile. Other errors concern one aborted connection.
      if (res == -EMFILE || res == -ENFILE || res == -ENOBUFS || res == -ENOMEM) {
        spdlog::warn("accept: {}; retrying in 100 ms", errno_message(res));
        (void)co_await core::sleep(std::chrono::milliseconds(100)).cancel_on(server->accept_cancel);
      }
      continue;
    }
    sys::UniqueFd fd(res);
    ++server->stats.accepted;
    if (server->stats.open_connections >= server->config.max_connections) {
      // Answer without waiting: a non-blocking send of a short message into an empty socket
      // buffer either fits or the client does not get the reason, only the close.
      ++server->stats.rejected_over_limit;
      (void)::send(fd.get(), kBusy.data(), kBusy.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
      continue;
    }
    ++server->stats.open_connections;
    server->scope.spawn(serve_connection(server, std::move(fd)));
  }
}

void append_histogram(std::string& out, std::string_view name, std::string_view help,
                      const core::Histogram& h) {
  out += fmt::format("# HELP {} {}\n# TYPE {} histogram\n", name, help, name);
  for (std::size_t i = 0; i < core::Histogram::kBounds.size(); ++i)
    out += fmt::format("{}_bucket{{le=\"{}\"}} {}\n", name, core::Histogram::kBounds[i],
                       h.bucket(i));
  out += fmt::format("{}_bucket{{le=\"+Inf\"}} {}\n{}_sum {}\n{}_count {}\n", name, h.count(),
                     name, h.sum(), name, h.count());
}

void append_scalar(std::string& out, std::string_view name, std::string_view type,
                   std::string_view help, double value) {
  out += fmt::format("# HELP {} {}\n# TYPE {} {}\n{} {}\n", name, help, name, type, name, value);
}

}  // namespace

std::string json_error(std::string_view message) {
  nlohmann::json j = {{"Err", std::string(message)}};
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
}

Server::Impl::Impl(driver::Driver& d, ServerConfig c) : driver(d), config(std::move(c)) {}

bool Server::Impl::peer_allowed(uid_t uid, gid_t gid) const {
  if (uid == 0 || uid == ::getuid() || uid == ::geteuid()) return true;
  if (std::find(config.allow_uids.begin(), config.allow_uids.end(), uid) != config.allow_uids.end())
    return true;
  return std::find(config.allow_gids.begin(), config.allow_gids.end(), gid) !=
         config.allow_gids.end();
}

void Server::Impl::record(std::string_view route, int status, double seconds) {
  ++stats.requests;
  ++requests_by_route[fmt::format("route=\"{}\",status=\"{}\"", route, status)];
  request_seconds.observe(seconds);
  spdlog::debug("{} -> {} in {:.3f} ms", route, status, seconds * 1000);
}

std::string Server::Impl::render_metrics() const {
  std::string out;
  out += "# HELP layerd_http_requests_total HTTP requests by route and status.\n"
         "# TYPE layerd_http_requests_total counter\n";
  for (const auto& [labels, count] : requests_by_route)
    out += fmt::format("layerd_http_requests_total{{{}}} {}\n", labels, count);
  append_histogram(out, "layerd_http_request_duration_seconds",
                   "Time from a request's head to the end of its answer.", request_seconds);
  append_scalar(out, "layerd_http_connections_open", "gauge", "Open client connections.",
                static_cast<double>(stats.open_connections));
  append_scalar(out, "layerd_http_connections_accepted_total", "counter",
                "Accepted client connections.", static_cast<double>(stats.accepted));
  append_scalar(out, "layerd_http_connections_refused_total", "counter",
                "Connections refused by the peer credential check.",
                static_cast<double>(stats.refused_peers));
  append_scalar(out, "layerd_http_connections_rejected_total", "counter",
                "Connections rejected because max-connections was reached.",
                static_cast<double>(stats.rejected_over_limit));
  append_scalar(out, "layerd_event_clients_dropped_total", "counter",
                "Event stream clients dropped for reading too slowly.",
                static_cast<double>(stats.dropped_event_clients));

  const driver::DriverMetrics& m = driver.metrics();
  append_scalar(out, "layerd_active_mounts", "gauge", "Layers mounted now.",
                static_cast<double>(driver.active_mounts()));
  append_scalar(out, "layerd_mounts_total", "counter", "Mounts performed.",
                static_cast<double>(m.mounts));
  append_scalar(out, "layerd_unmounts_total", "counter", "Unmounts performed.",
                static_cast<double>(m.unmounts));
  append_scalar(out, "layerd_mount_failures_total", "counter", "Mounts that failed.",
                static_cast<double>(m.mount_failures));
  append_scalar(out, "layerd_remounts_total", "counter", "Dead mounts healed by a remount.",
                static_cast<double>(m.remounts));
  out += "# HELP layerd_child_exits_total FUSE server exits by reason.\n"
         "# TYPE layerd_child_exits_total counter\n";
  for (const auto& [labels, count] : m.child_exits)
    out += fmt::format("layerd_child_exits_total{{{}}} {}\n", labels, count);
  append_histogram(out, "layerd_mount_duration_seconds", "Time to mount a layer.",
                   m.mount_seconds);
  append_histogram(out, "layerd_unmount_duration_seconds", "Time to unmount a layer.",
                   m.unmount_seconds);
  append_scalar(out, "layerd_uptime_seconds", "gauge", "Seconds since the server started.",
                std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
  return out;
}

Server::Server(driver::Driver& driver, ServerConfig config)
    : impl_(std::make_unique<Impl>(driver, std::move(config))) {}

Server::~Server() = default;

const ServerConfig& Server::config() const noexcept { return impl_->config; }
ServerStats Server::stats() const noexcept { return impl_->stats; }

void Server::listen() {
  std::optional<gid_t> group;
  if (!impl_->config.socket_group.empty()) group = resolve_group(impl_->config.socket_group);
  for (const std::string& path : impl_->config.socket_paths) {
    sockaddr_un addr = unix_address(path);
    std::error_code ec;
    std::filesystem::path parent = std::filesystem::path(path).parent_path();
    if (!parent.empty()) std::filesystem::create_directories(parent, ec);
    if (ec) throw Error(ec.value(), "creating the directory of socket " + path);
    remove_stale_socket(path, addr);

    sys::UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd) throw Error(errno, "socket for " + path);
    if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0)
      throw Error(errno, "binding " + path);
    // Connecting needs write permission on the socket file: 0660 limits it to the owner and
    // the socket group; SO_PEERCRED then checks each peer.
    if (::chmod(path.c_str(), 0660) != 0) throw Error(errno, "chmod 0660 " + path);
    if (group && ::chown(path.c_str(), static_cast<uid_t>(-1), *group) != 0)
      throw Error(errno, "chown of " + path + " to group " + impl_->config.socket_group);
    if (::listen(fd.get(), impl_->config.listen_backlog) != 0)
      throw Error(errno, "listening on " + path);
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) throw Error(errno, "stat " + path);
    impl_->listeners.push_back(Impl::Listener{std::move(fd), path, st.st_dev, st.st_ino});
  }
}

void Server::stop() noexcept {
  if (impl_->stopping) return;
  impl_->stopping = true;
  impl_->stop_requested.set();
}

core::Task<bool> Server::run() {
  Impl& s = *impl_;
  for (auto& listener : s.listeners) s.scope.spawn(accept_loop(&s, listener.fd.get()));
  if (!s.stopping) (void)co_await s.stop_requested.wait();

  // Stop accepting, end idle connections and event streams, let requests in flight finish.
  s.accept_cancel.cancel();
  for (Connection* c : s.connections) c->interrupt();
  bool joined = co_await s.scope.join_for(s.config.shutdown_grace);
  if (!joined) {
    // Grace is over: close the sockets under what is left. A handler stuck in a driver call
    // still keeps its frame, which the caller learns from the result.
    for (Connection* c : s.connections) c->abort_socket();
    joined = co_await s.scope.join_for(s.config.shutdown_grace);
  }
  for (auto& listener : s.listeners) {
    // Remove the file only if it is still the one we bound (a new server may own the path).
    struct stat st {};
    if (::lstat(listener.path.c_str(), &st) == 0 && st.st_dev == listener.dev &&
        st.st_ino == listener.ino)
      (void)::unlink(listener.path.c_str());
    listener.fd.reset();
  }
  co_return joined;
}

}  // namespace layerd::api
