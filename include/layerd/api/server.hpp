// The control socket: an HTTP/1.1 server on the io_uring loop that speaks Docker's graphdriver
// plugin protocol (POST /Plugin.Activate, POST /GraphDriver.*) and layerd's native routes
// (GET /v1/health, /v1/layers, /v1/events, /metrics). One coroutine per connection, all in one
// Scope that shutdown joins. Everything a client controls is bounded (see ServerConfig).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "layerd/core/task.hpp"

namespace layerd::driver {
class Driver;
}

namespace layerd::api {

struct ServerConfig {
  // Every path is bound with mode 0660 (group: socket_group). The first is layerd's own socket;
  // more (the Docker plugin socket) serve the same routes.
  std::vector<std::string> socket_paths = {"/run/layerd/layerd.sock"};
  // Group owning the sockets: a name or a numeric gid; empty keeps the daemon's group.
  std::string socket_group;
  // Peers allowed besides uid 0 and the daemon's own uid (checked with SO_PEERCRED).
  std::vector<uid_t> allow_uids;
  std::vector<gid_t> allow_gids;

  std::size_t max_header_bytes = 16 * 1024;    // request line + headers -> 431 beyond
  std::size_t max_json_bytes = 1024 * 1024;    // JSON request bodies -> 413 beyond
  std::size_t max_connections = 4096;          // beyond it: 503, then close
  std::chrono::milliseconds idle_timeout{60'000};         // between requests
  std::chrono::milliseconds slow_client_timeout{30'000};  // a request's head; body/send progress
  // How long shutdown waits for in-flight requests before it closes their sockets.
  std::chrono::milliseconds shutdown_grace{500};
  // Events queued for one /v1/events client before it is dropped as too slow.
  std::size_t event_queue_limit = 1024;
  // How often an /v1/events stream without events checks that its client is still there.
  std::chrono::milliseconds event_liveness_interval{5'000};
  int listen_backlog = 4096;
};

// Counters the server keeps about itself (also rendered on /metrics).
struct ServerStats {
  std::size_t open_connections = 0;
  std::uint64_t accepted = 0;
  std::uint64_t refused_peers = 0;       // 403: SO_PEERCRED not allowed
  std::uint64_t rejected_over_limit = 0;  // 503: max_connections reached
  std::uint64_t requests = 0;
  std::uint64_t dropped_event_clients = 0;
};

class Server {
 public:
  Server(driver::Driver& driver, ServerConfig config);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Creates, binds and listens on every socket path (replacing a stale socket file, refusing
  // one that a live server still answers on). Throws layerd::Error with the path as context.
  void listen();

  // Serves until stop(): accepts connections and runs them. Then stops accepting, lets
  // in-flight requests finish for shutdown_grace, closes what is left, removes the socket
  // files it created and returns. Resolves to false if some request was still running after
  // the sockets were closed (a driver call that does not return): the caller should then exit
  // without destroying the server.
  core::Task<bool> run();

  // Begins shutdown (idempotent; callable before run()).
  void stop() noexcept;

  [[nodiscard]] ServerStats stats() const noexcept;
  [[nodiscard]] const ServerConfig& config() const noexcept;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace layerd::api
