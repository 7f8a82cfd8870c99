#include "http_client.hpp"

#include <fcntl.h>
#include <http_parser.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <strings.h>

#include <fmt/format.h>

namespace layerd::tools {

std::string_view to_string(HttpErrorKind kind) noexcept {
  switch (kind) {
    case HttpErrorKind::kConnect: return "connect";
    case HttpErrorKind::kTimeout: return "timeout";
    case HttpErrorKind::kClosed: return "closed";
    case HttpErrorKind::kProtocol: return "protocol";
    case HttpErrorKind::kIo: return "io";
  }
  return "unknown";
}

std::string_view find_header(const HttpHeaders& headers, std::string_view name) noexcept {
  for (const auto& [key, value] : headers) {
    if (key.size() == name.size() && strncasecmp(key.data(), name.data(), name.size()) == 0) {
      return value;
    }
  }
  return {};
}

namespace {

bool has_header(const HttpHeaders& headers, std::string_view name) {
  for (const auto& [key, value] : headers) {
    if (key.size() == name.size() && strncasecmp(key.data(), name.data(), name.size()) == 0) {
      return true;
    }
  }
  return false;
}

}  // namespace

std::string serialize_head(const HttpRequest& request) {
  std::string out;
  out.reserve(256 + request.target.size());
  out += request.method;
  out += ' ';
  out += request.target;
  out += " HTTP/1.1\r\n";
  // The same headers dockerd's plugin client sends, so layerd sees tools exactly like dockerd.
  if (!has_header(request.headers, "Host")) out += "Host: \r\n";
  if (!has_header(request.headers, "User-Agent")) out += "User-Agent: layerd-tools/1\r\n";
  if (!has_header(request.headers, "Accept")) {
    out += "Accept: application/vnd.docker.plugins.v1.2+json\r\n";
  }
  for (const auto& [key, value] : request.headers) {
    out += key;
    out += ": ";
    out += value;
    out += "\r\n";
  }
  if (request.chunked) {
    out += "Transfer-Encoding: chunked\r\n";
  } else {
    out += fmt::format("Content-Length: {}\r\n", request.body.size());
  }
  out += "\r\n";
  return out;
}

std::string serialize(const HttpRequest& request) {
  std::string out = serialize_head(request);
  if (!request.chunked) out += request.body;
  return out;
}

std::string encode_chunk(std::string_view data) {
  if (data.empty()) return {};
  std::string out = fmt::format("{:x}\r\n", data.size());
  out.reserve(out.size() + data.size() + 2);
  out += data;
  out += "\r\n";
  return out;
}

std::string url_encode(std::string_view text) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(text.size());
  for (unsigned char c : text) {
    bool unreserved = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                      c == '-' || c == '_' || c == '.' || c == '~';
    if (unreserved) {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

HttpRequest plugin_request(std::string_view method, const nlohmann::json& body) {
  HttpRequest request;
  request.method = "POST";
  request.target = fmt::format("/GraphDriver.{}", method);
  request.body = body.dump() + "\n";
  return request;
}

nlohmann::json layer_args(std::string_view id, std::string_view parent) {
  nlohmann::json args = nlohmann::json::object();
  if (!id.empty()) args["ID"] = std::string(id);
  if (!parent.empty()) args["Parent"] = std::string(parent);
  return args;
}

std::string apply_diff_target(std::string_view id, std::string_view parent) {
  return fmt::format("/GraphDriver.ApplyDiff?id={}&parent={}", url_encode(id), url_encode(parent));
}

// ---------------------------------------------------------------------------------------------
// ResponseParser

struct ResponseParser::State {
  http_parser parser{};
  http_parser_settings settings{};
  ResponseParser* owner = nullptr;
  std::string error;  // set by a callback that refuses input

  static ResponseParser& self(http_parser* p) {
    return *static_cast<State*>(p->data)->owner;
  }

  static int on_header_field(http_parser* p, const char* at, size_t len) {
    ResponseParser& r = self(p);
    // http-parser may split a field or value over several callbacks.
    if (r.headers_.empty() || r.last_was_value_) r.headers_.emplace_back();
    r.headers_.back().first.append(at, len);
    r.last_was_value_ = false;
    return 0;
  }
  static int on_header_value(http_parser* p, const char* at, size_t len) {
    ResponseParser& r = self(p);
    if (r.headers_.empty()) r.headers_.emplace_back();
    r.headers_.back().second.append(at, len);
    r.last_was_value_ = true;
    return 0;
  }
  static int on_headers_complete(http_parser* p) {
    ResponseParser& r = self(p);
    r.status_ = static_cast<int>(p->status_code);
    r.headers_complete_ = true;
    if (r.on_headers_) r.on_headers_(r);
    return 0;
  }
  static int on_body(http_parser* p, const char* at, size_t len) {
    ResponseParser& r = self(p);
    r.body_bytes_ += len;
    if (r.sink_) {
      r.sink_(std::string_view(at, len));
      return 0;
    }
    if (r.body_.size() + len > r.max_buffered_body_) {
      static_cast<State*>(p->data)->error =
          fmt::format("response body larger than {} bytes", r.max_buffered_body_);
      return -1;
    }
    r.body_.append(at, len);
    return 0;
  }
  static int on_message_complete(http_parser* p) {
    ResponseParser& r = self(p);
    r.complete_ = true;
    r.keep_alive_ = http_should_keep_alive(p) != 0;
    // Stop here: bytes after this response belong to the next one.
    http_parser_pause(p, 1);
    return 0;
  }
};

ResponseParser::ResponseParser(std::size_t max_buffered_body)
    : state_(std::make_unique<State>()), max_buffered_body_(max_buffered_body) {
  state_->owner = this;
  http_parser_settings_init(&state_->settings);
  state_->settings.on_header_field = &State::on_header_field;
  state_->settings.on_header_value = &State::on_header_value;
  state_->settings.on_headers_complete = &State::on_headers_complete;
  state_->settings.on_body = &State::on_body;
  state_->settings.on_message_complete = &State::on_message_complete;
  reset();
}

ResponseParser::~ResponseParser() = default;

void ResponseParser::reset() {
  http_parser_init(&state_->parser, HTTP_RESPONSE);
  state_->parser.data = state_.get();
  state_->error.clear();
  headers_.clear();
  body_.clear();
  body_bytes_ = 0;
  status_ = 0;
  headers_complete_ = false;
  complete_ = false;
  keep_alive_ = false;
  last_was_value_ = false;
  sink_ = nullptr;
}

std::size_t ResponseParser::feed(std::string_view data) {
  if (complete_ || data.empty()) return 0;
  std::size_t used = http_parser_execute(&state_->parser, &state_->settings, data.data(), data.size());
  auto err = static_cast<http_errno>(state_->parser.http_errno);
  if (err == HPE_PAUSED) {
    // Paused by on_message_complete: the response is complete and `used` ends right after it;
    // any further bytes start the next response.
    http_parser_pause(&state_->parser, 0);
    return used;
  }
  if (err != HPE_OK) {
    std::string why = state_->error.empty()
                          ? fmt::format("{}: {}", http_errno_name(err), http_errno_description(err))
                          : state_->error;
    throw HttpError(HttpErrorKind::kProtocol, fmt::format("malformed HTTP response: {}", why));
  }
  return used;
}

void ResponseParser::finish() {
  if (complete_) return;
  // A zero-length execute tells http-parser about EOF; it completes close-delimited bodies.
  (void)http_parser_execute(&state_->parser, &state_->settings, nullptr, 0);
  auto err = static_cast<http_errno>(state_->parser.http_errno);
  if (err == HPE_PAUSED) http_parser_pause(&state_->parser, 0);
  if (!complete_) {
    throw HttpError(HttpErrorKind::kClosed,
                    headers_complete_ ? "connection closed in the middle of the response body"
                                      : "connection closed before a response arrived");
  }
  keep_alive_ = false;
}

// ---------------------------------------------------------------------------------------------
// UnixHttpClient

UnixHttpClient::UnixHttpClient(std::string socket_path, std::chrono::milliseconds idle_timeout)
    : path_(std::move(socket_path)), timeout_(idle_timeout) {}

UnixHttpClient::~UnixHttpClient() { close(); }

void UnixHttpClient::close() noexcept {
  if (fd_ >= 0) {
    (void)::close(fd_);
    fd_ = -1;
  }
  leftover_.clear();
}

void UnixHttpClient::set_idle_timeout(std::chrono::milliseconds timeout) { timeout_ = timeout; }

namespace {

// Waits until `fd` is ready for `events`; throws kTimeout when the idle timeout passes.
void wait_ready(int fd, short events, std::chrono::milliseconds timeout, const char* what) {
  int ms = timeout.count() > 0 ? static_cast<int>(timeout.count()) : -1;
  for (;;) {
    pollfd pfd{fd, events, 0};
    int n = ::poll(&pfd, 1, ms);
    if (n > 0) return;
    if (n == 0) {
      throw HttpError(HttpErrorKind::kTimeout,
                      fmt::format("timed out after {} ms waiting to {}", timeout.count(), what));
    }
    if (errno != EINTR) {
      throw HttpError(HttpErrorKind::kIo, fmt::format("poll: {}", std::strerror(errno)));
    }
  }
}

}  // namespace

void UnixHttpClient::connect() {
  close();
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path_.empty() || path_.size() >= sizeof(addr.sun_path)) {
    throw HttpError(HttpErrorKind::kConnect,
                    fmt::format("socket path '{}' is empty or too long", path_));
  }
  std::memcpy(addr.sun_path, path_.data(), path_.size());
  // Non-blocking so every wait goes through poll() with the idle timeout.
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    throw HttpError(HttpErrorKind::kConnect, fmt::format("socket: {}", std::strerror(errno)));
  }
  for (;;) {
    if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) == 0) break;
    int err = errno;
    if (err == EINTR) continue;
    if (err == EAGAIN || err == EINPROGRESS) {
      // A unix socket answers EAGAIN when the listener's backlog is full: wait and retry.
      try {
        wait_ready(fd, POLLOUT, timeout_, "connect");
      } catch (...) {
        (void)::close(fd);
        throw;
      }
      int soerr = 0;
      socklen_t len = sizeof(soerr);
      (void)::getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len);
      if (soerr == 0) break;
      err = soerr;
    }
    (void)::close(fd);
    throw HttpError(HttpErrorKind::kConnect,
                    fmt::format("cannot connect to {}: {}", path_, std::strerror(err)));
  }
  fd_ = fd;
}

void UnixHttpClient::send_all(std::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::send(fd_, data.data(), data.size(), MSG_NOSIGNAL);
    if (n > 0) {
      data.remove_prefix(static_cast<std::size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      wait_ready(fd_, POLLOUT, timeout_, "send the request");
      continue;
    }
    int err = errno;
    if (err == EPIPE || err == ECONNRESET) {
      throw HttpError(HttpErrorKind::kClosed,
                      fmt::format("daemon closed the connection while sending: {}",
                                  std::strerror(err)));
    }
    throw HttpError(HttpErrorKind::kIo, fmt::format("send: {}", std::strerror(err)));
  }
}

void UnixHttpClient::receive(ResponseParser& parser) {
  // Bytes of a previous read that followed the last response.
  if (!leftover_.empty()) {
    std::string pending = std::move(leftover_);
    leftover_.clear();
    std::size_t used = parser.feed(pending);
    if (parser.complete()) {
      leftover_ = pending.substr(used);
      return;
    }
  }
  std::string buffer(256 * 1024, '\0');
  while (!parser.complete()) {
    ssize_t n = ::recv(fd_, buffer.data(), buffer.size(), 0);
    if (n > 0) {
      std::string_view chunk(buffer.data(), static_cast<std::size_t>(n));
      std::size_t used = parser.feed(chunk);
      if (parser.complete()) leftover_.assign(chunk.substr(used));
      continue;
    }
    if (n == 0) {
      parser.finish();
      return;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      wait_ready(fd_, POLLIN, timeout_, "receive the answer");
      continue;
    }
    int err = errno;
    if (err == ECONNRESET) {
      throw HttpError(HttpErrorKind::kClosed, "daemon reset the connection");
    }
    throw HttpError(HttpErrorKind::kIo, fmt::format("recv: {}", std::strerror(err)));
  }
}

HttpResponse UnixHttpClient::request(const HttpRequest& req) {
  ResponseParser parser;
  bool reused = connected();
  try {
    return exchange(req, parser);
  } catch (const HttpError& e) {
    // A kept-alive connection the server closed meanwhile fails before any answer byte; the
    // request was not processed, so it is safe to send it once more on a fresh connection.
    if (!reused || e.kind() != HttpErrorKind::kClosed || parser.headers_complete()) throw;
  }
  close();
  ResponseParser retry;
  return exchange(req, retry);
}

HttpResponse UnixHttpClient::exchange(const HttpRequest& req, ResponseParser& parser,
                                      const BodyReader& body) {
  if (!connected()) connect();
  parser.reset();
  HttpRequest head = req;
  head.chunked = static_cast<bool>(body);
  try {
    if (!body) {
      send_all(serialize(head));
    } else {
      send_all(serialize_head(head));
      std::string buffer(256 * 1024, '\0');
      bool rejected = false;
      for (;;) {
        std::size_t n = body(buffer.data(), buffer.size());
        if (n == 0) break;
        try {
          send_all(encode_chunk(std::string_view(buffer.data(), n)));
        } catch (const HttpError& e) {
          // The server stopped reading (it answered early, e.g. with an error, and closed):
          // its answer, if any, explains why better than EPIPE does.
          if (e.kind() != HttpErrorKind::kClosed) throw;
          rejected = true;
          break;
        }
      }
      if (!rejected) send_all(kLastChunk);
    }
    receive(parser);
  } catch (...) {
    close();
    throw;
  }
  if (!parser.keep_alive()) close();
  HttpResponse response;
  response.status = parser.status();
  response.headers = parser.headers();
  response.body = parser.take_body();
  return response;
}

}  // namespace layerd::tools
