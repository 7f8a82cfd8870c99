// A small HTTP/1.1 client toolkit for layerd's tools (layerctl, layerbench, tests). It has no
// dependency on the daemon's code: it talks to layerd only over its unix socket, like dockerd does.
//
// Three layers, usable separately:
// - request building (`HttpRequest`, `serialize_head`, `encode_chunk`, plugin body helpers);
// - `ResponseParser`, an incremental response parser over http-parser (Content-Length, chunked
//   and close-delimited bodies, keep-alive), fed bytes by any transport (blocking or libuv);
// - `UnixHttpClient`, a blocking keep-alive client on a unix socket with an idle timeout.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace layerd::tools {

// Why an exchange failed; tools map these to exit codes and error kinds.
enum class HttpErrorKind {
  kConnect,   // the socket could not be reached (missing, refused, permission)
  kTimeout,   // no progress within the idle timeout
  kClosed,    // the peer closed or reset the connection before the answer was complete
  kProtocol,  // the answer is not valid HTTP/1.1 or exceeds a limit
  kIo,        // another local I/O failure
};

[[nodiscard]] std::string_view to_string(HttpErrorKind kind) noexcept;

class HttpError : public std::runtime_error {
 public:
  HttpError(HttpErrorKind kind, const std::string& message)
      : std::runtime_error(message), kind_(kind) {}
  [[nodiscard]] HttpErrorKind kind() const noexcept { return kind_; }

 private:
  HttpErrorKind kind_;
};

using HttpHeaders = std::vector<std::pair<std::string, std::string>>;

// Case-insensitive header lookup; empty when absent.
[[nodiscard]] std::string_view find_header(const HttpHeaders& headers,
                                           std::string_view name) noexcept;

struct HttpRequest {
  std::string method = "POST";
  std::string target = "/";
  HttpHeaders headers;  // extra headers; Host, Content-Length/Transfer-Encoding are added
  std::string body;     // ignored when chunked
  bool chunked = false; // the body follows as chunks (encode_chunk, then kLastChunk)
};

// The request line and headers, ending with the blank line. Adds the headers dockerd sends
// (empty Host, User-Agent, the plugin Accept type) unless the request has them, and either
// Content-Length or Transfer-Encoding: chunked.
[[nodiscard]] std::string serialize_head(const HttpRequest& request);
// serialize_head plus the body (for non-chunked requests).
[[nodiscard]] std::string serialize(const HttpRequest& request);
// One chunk of a chunked body; an empty `data` gives an empty string (never the last chunk).
[[nodiscard]] std::string encode_chunk(std::string_view data);
inline constexpr std::string_view kLastChunk = "0\r\n\r\n";

// Percent-encodes a query component (RFC 3986 unreserved characters stay as they are).
[[nodiscard]] std::string url_encode(std::string_view text);

// Plugin protocol helpers: `POST /GraphDriver.<method>` with the JSON body dockerd sends
// (one object plus "\n"; empty optional fields omitted, as Go's omitempty does).
[[nodiscard]] HttpRequest plugin_request(std::string_view method, const nlohmann::json& body);
[[nodiscard]] nlohmann::json layer_args(std::string_view id, std::string_view parent = {});
// The target of ApplyDiff: ids in the query string, `parent=` present even when empty.
[[nodiscard]] std::string apply_diff_target(std::string_view id, std::string_view parent);

// Incremental HTTP/1.1 response parser. Feed bytes as they arrive; after `complete()`, call
// `reset()` to parse the next response on a keep-alive connection.
class ResponseParser {
 public:
  // Called once when the status line and headers are parsed. It may install a body sink with
  // `stream_body_to()`; otherwise the body is buffered (up to max_buffered_body).
  using HeadersHandler = std::function<void(ResponseParser&)>;
  using BodySink = std::function<void(std::string_view)>;

  explicit ResponseParser(std::size_t max_buffered_body = 64u << 20);
  ~ResponseParser();
  ResponseParser(const ResponseParser&) = delete;
  ResponseParser& operator=(const ResponseParser&) = delete;

  void on_headers(HeadersHandler handler) { on_headers_ = std::move(handler); }
  void stream_body_to(BodySink sink) { sink_ = std::move(sink); }

  // Consumes bytes up to the end of the current response and returns how many were used
  // (fewer than `data.size()` only when the response completed inside `data`).
  // Throws HttpError(kProtocol) on malformed input or an exceeded limit.
  std::size_t feed(std::string_view data);
  // The peer closed the connection: completes a close-delimited body, or throws
  // HttpError(kClosed) if the response was cut short.
  void finish();
  void reset();

  [[nodiscard]] bool headers_complete() const noexcept { return headers_complete_; }
  [[nodiscard]] bool complete() const noexcept { return complete_; }
  [[nodiscard]] int status() const noexcept { return status_; }
  [[nodiscard]] const HttpHeaders& headers() const noexcept { return headers_; }
  [[nodiscard]] const std::string& body() const noexcept { return body_; }
  [[nodiscard]] std::string take_body() noexcept { return std::move(body_); }
  [[nodiscard]] std::uint64_t body_bytes() const noexcept { return body_bytes_; }
  // Valid once complete: whether the connection may carry another request.
  [[nodiscard]] bool keep_alive() const noexcept { return keep_alive_; }

 private:
  struct State;
  friend struct State;
  std::unique_ptr<State> state_;
  std::size_t max_buffered_body_;
  HeadersHandler on_headers_;
  BodySink sink_;
  HttpHeaders headers_;
  std::string body_;
  std::uint64_t body_bytes_ = 0;
  int status_ = 0;
  bool headers_complete_ = false;
  bool complete_ = false;
  bool keep_alive_ = false;
  bool last_was_value_ = false;
};

struct HttpResponse {
  int status = 0;
  HttpHeaders headers;
  std::string body;  // empty when the body was streamed to a sink
};

// Reads request body bytes into `buffer` (at most `size`); returns 0 at the end.
using BodyReader = std::function<std::size_t(char* buffer, std::size_t size)>;

// A blocking HTTP/1.1 client on a unix socket. Connects lazily, keeps the connection alive
// between requests and reconnects when the server closed it. `idle_timeout` bounds every wait
// for progress (connect, each send, each receive); zero waits forever.
class UnixHttpClient {
 public:
  explicit UnixHttpClient(std::string socket_path,
                          std::chrono::milliseconds idle_timeout = std::chrono::seconds(60));
  ~UnixHttpClient();
  UnixHttpClient(const UnixHttpClient&) = delete;
  UnixHttpClient& operator=(const UnixHttpClient&) = delete;

  void connect();
  void close() noexcept;
  [[nodiscard]] bool connected() const noexcept { return fd_ >= 0; }
  [[nodiscard]] const std::string& socket_path() const noexcept { return path_; }
  // Changes the idle timeout, e.g. to wait forever once a stream's headers arrived.
  void set_idle_timeout(std::chrono::milliseconds timeout);

  // Sends a complete request and returns the buffered answer.
  HttpResponse request(const HttpRequest& request);
  // Like request(), but the answer goes through `parser` (its on_headers handler can stream the
  // body). When `body` is given the request is sent chunked, pulling bytes from it; the answer
  // is still read if the server stops reading early (e.g. it rejects the upload).
  HttpResponse exchange(const HttpRequest& request, ResponseParser& parser,
                        const BodyReader& body = {});

 private:
  void send_all(std::string_view data);
  void receive(ResponseParser& parser);

  std::string path_;
  std::chrono::milliseconds timeout_;
  int fd_ = -1;
  std::string leftover_;
};

}  // namespace layerd::tools
