// Private to api/: the server's state and one HTTP connection.
#pragma once

#include <http_parser.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <vector>

#include "layerd/api/server.hpp"
#include "layerd/archive/stream.hpp"
#include "layerd/core/cancel.hpp"
#include "layerd/core/metrics.hpp"
#include "layerd/core/ops.hpp"
#include "layerd/core/scope.hpp"
#include "layerd/driver/driver.hpp"
#include "layerd/sync/sync.hpp"
#include "layerd/sys/error.hpp"
#include "layerd/sys/fd.hpp"

namespace layerd::api {

// An HTTP-level failure: answered with `status` and {"Err": message}. `close` ends the
// connection after the answer (the request's bytes could not be consumed cleanly).
class HttpError : public Error {
 public:
  HttpError(int status, const std::string& message, bool close = false)
      : Error(EPROTO, message), status_(status), close_(close), message_(message) {}
  [[nodiscard]] int status() const noexcept { return status_; }
  [[nodiscard]] bool close() const noexcept { return close_; }
  [[nodiscard]] const std::string& message() const noexcept { return message_; }

 private:
  int status_;
  bool close_;
  std::string message_;
};

struct Request {
  http_method method = HTTP_GET;
  std::string target;  // as sent: path and query
  std::string path;
  std::string query;
  std::vector<std::pair<std::string, std::string>> headers;  // names in lower case
  bool keep_alive = true;
  bool has_body = false;        // Content-Length > 0 or chunked
  bool expect_continue = false;

  [[nodiscard]] const std::string* header(std::string_view name) const;
  // Percent-decoded value of `key` in the query ("" when absent).
  [[nodiscard]] std::string query_param(std::string_view key) const;
};

// What a handler answers, unless it streamed its answer itself (`sent`).
struct Response {
  int status = 200;
  std::string content_type;
  std::string body;
  bool sent = false;
  bool close = false;  // a streamed answer that could not be finished cleanly
};

class Connection;

// Queue of rendered events for one /v1/events client.
struct EventQueue {
  std::deque<std::string> lines;
  std::size_t limit = 0;
  bool overflowed = false;
  sync::Event ready;
};

struct Server::Impl {
  Impl(driver::Driver& d, ServerConfig c);

  driver::Driver& driver;
  ServerConfig config;
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();

  struct Listener {
    sys::UniqueFd fd;
    std::string path;
    dev_t dev = 0;
    ino_t ino = 0;
  };
  std::vector<Listener> listeners;

  core::Scope scope;
  core::CancelSource accept_cancel;
  sync::Event stop_requested;
  bool stopping = false;
  std::unordered_set<Connection*> connections;
  ServerStats stats;

  // Metrics about requests: label set `route="...",status="..."`.
  core::LabeledCounter requests_by_route;
  core::Histogram request_seconds;

  void record(std::string_view route, int status, double seconds);
  [[nodiscard]] bool peer_allowed(uid_t uid, gid_t gid) const;
  [[nodiscard]] std::string render_metrics() const;
};

// One accepted connection: reads requests one at a time (pipelined bytes wait in the input
// buffer), runs the matching handler, answers, and repeats while keep-alive holds.
class Connection {
 public:
  Connection(Server::Impl& server, sys::UniqueFd fd);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  core::Task<void> run();

  // The server is stopping: give up waiting for the next request or event.
  void interrupt() noexcept;
  // Shutdown grace is over: unblock every socket operation.
  void abort_socket() noexcept;

  // Request body, pulled through the parser: fills `buf` whole unless the body ends first (0 at
  // its end). Throws layerd::Error when the client goes away, stalls longer than the slow-client
  // timeout, or sends a malformed chunk.
  core::Task<std::size_t> read_body(std::span<std::byte> buf);
  // The whole body as a string, at most max_json_bytes (HttpError 413 beyond).
  core::Task<std::string> read_small_body();

  // Sends all of `data` (slow-client timeout per send). Throws layerd::Error on failure.
  core::Task<void> send_all(std::string_view data);
  // Sends a complete answer with Content-Length.
  core::Task<void> send_response(int status, std::string_view content_type,
                                 std::string_view body, bool close,
                                 std::string_view extra_headers = {});
  // Starts a chunked answer; chunks follow with send_chunk, end with finish_chunks.
  core::Task<void> begin_chunked(int status, std::string_view content_type);
  core::Task<void> send_chunk(std::span<const std::byte> data);
  core::Task<void> finish_chunks();

  // Waits until `queue` has lines or overflows, or the connection is interrupted or the peer
  // has gone. Resolves to false when the stream should end.
  core::Task<bool> wait_for_events(EventQueue& queue);

  [[nodiscard]] Server::Impl& server() noexcept { return server_; }
  [[nodiscard]] const Request& request() const noexcept { return request_; }
  [[nodiscard]] bool closing() const noexcept { return close_after_; }

 private:
  enum class HeadResult { kRequest, kClosed };
  core::Task<HeadResult> read_head();
  core::Task<Response> dispatch(std::string& route);
  core::Task<bool> drain_body(std::size_t limit);
  // Receives into the input buffer; result as recv (0 at EOF, negative errno).
  core::Task<int> fill(core::CancelSource& cancel, std::optional<std::chrono::milliseconds> t);
  // Feeds buffered input to the parser (at most `max` bytes). Throws HttpError on bad input.
  std::size_t feed(std::size_t max);
  // Runs the parser over `data` (the input buffer, or body bytes received straight into a
  // reader's buffer). Throws HttpError on bad input.
  std::size_t parse(const char* data, std::size_t size);
  // Receives into `into`; result as recv. The slow-client timeout applies.
  core::Task<int> receive_body_bytes(std::span<std::byte> into);
  void reset_request();

  static int on_url(http_parser* p, const char* at, std::size_t len);
  static int on_header_field(http_parser* p, const char* at, std::size_t len);
  static int on_header_value(http_parser* p, const char* at, std::size_t len);
  static int on_headers_complete(http_parser* p);
  static int on_body(http_parser* p, const char* at, std::size_t len);
  static int on_message_complete(http_parser* p);

  Server::Impl& server_;
  sys::UniqueFd fd_;
  http_parser parser_{};
  http_parser_settings settings_{};

  std::vector<char> in_;
  std::size_t in_begin_ = 0;
  std::size_t in_end_ = 0;

  Request request_;
  bool last_was_value_ = false;
  std::size_t head_bytes_ = 0;
  bool headers_complete_ = false;
  bool message_complete_ = false;
  std::string body_buf_;  // decoded body bytes the parser produced and read_body has not taken
  std::span<std::byte> body_target_;  // the rest of read_body's buffer while it feeds the parser
  const char* body_end_ = nullptr;     // just past the body bytes the parser reported last
  // Body bytes that follow for certain (the rest of a Content-Length body or of the current
  // chunk) when the last parse ended inside body data; 0 when unknown.
  std::uint64_t body_data_left_ = 0;
  std::size_t body_off_ = 0;
  bool continue_sent_ = false;
  bool response_started_ = false;
  bool close_after_ = false;
  bool interrupted_ = false;
  core::CancelSource* waiting_ = nullptr;  // the cancel source of the current wait, if any
  bool waiting_interruptible_ = false;     // that wait ends on shutdown (idle, event stream)
};

// Routes (routes.cpp): runs the handler for the connection's current request.
core::Task<Response> handle_request(Connection& conn, std::string& route);

std::string json_error(std::string_view message);

}  // namespace layerd::api
