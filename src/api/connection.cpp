#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <climits>
#include <cstring>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "internal.hpp"

namespace layerd::api {

namespace {

// Input buffer: small while a connection idles (1,000 idle clients must not pin 64 MiB), grown
// on demand up to 64 KiB for a request's head, and to 256 KiB while a large request body streams
// in (given back when the request is done): with 4 KiB receives a 1 GiB ApplyDiff took 13-15 s.
constexpr std::size_t kInputBufferInitialBytes = 4 * 1024;
constexpr std::size_t kInputBufferBytes = 64 * 1024;
constexpr std::size_t kBodyInputBufferBytes = 256 * 1024;

// Registers the cancel source of the wait in progress so that interrupt()/abort_socket() can end
// it; `interruptible` waits (idle between requests, an event stream) end on shutdown at once,
// the others (a request's bytes) only when the grace period is over.
class WaitScope {
 public:
  WaitScope(core::CancelSource*& slot, bool& interruptible_slot, core::CancelSource& source,
            bool interruptible)
      : slot_(slot), interruptible_slot_(interruptible_slot) {
    slot_ = &source;
    interruptible_slot_ = interruptible;
  }
  ~WaitScope() {
    slot_ = nullptr;
    interruptible_slot_ = false;
  }
  WaitScope(const WaitScope&) = delete;
  WaitScope& operator=(const WaitScope&) = delete;

 private:
  core::CancelSource*& slot_;
  bool& interruptible_slot_;
};

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return std::tolower(static_cast<unsigned char>(x)) ==
                  std::tolower(static_cast<unsigned char>(y));
         });
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::string percent_decode(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size()) {
      int hi = hex_value(s[i + 1]);
      int lo = hex_value(s[i + 2]);
      if (hi >= 0 && lo >= 0) {
        out.push_back(static_cast<char>(hi * 16 + lo));
        i += 2;
        continue;
      }
    }
    out.push_back(s[i] == '+' ? ' ' : s[i]);
  }
  return out;
}

const char* reason_phrase(int status) {
  switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 400: return "Bad Request";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 413: return "Payload Too Large";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 503: return "Service Unavailable";
    default: return "Unknown";
  }
}

}  // namespace

const std::string* Request::header(std::string_view name) const {
  for (const auto& [key, value] : headers)
    if (key == name) return &value;
  return nullptr;
}

std::string Request::query_param(std::string_view key) const {
  std::string_view rest = query;
  while (!rest.empty()) {
    std::size_t amp = rest.find('&');
    std::string_view pair = rest.substr(0, amp);
    rest = amp == std::string_view::npos ? std::string_view{} : rest.substr(amp + 1);
    std::size_t eq = pair.find('=');
    std::string name = percent_decode(pair.substr(0, eq));
    if (name == key) return eq == std::string_view::npos ? "" : percent_decode(pair.substr(eq + 1));
  }
  return {};
}

Connection::Connection(Server::Impl& server, sys::UniqueFd fd)
    : server_(server), fd_(std::move(fd)), in_(kInputBufferInitialBytes) {
  http_parser_init(&parser_, HTTP_REQUEST);
  parser_.data = this;
  http_parser_settings_init(&settings_);
  settings_.on_url = &Connection::on_url;
  settings_.on_header_field = &Connection::on_header_field;
  settings_.on_header_value = &Connection::on_header_value;
  settings_.on_headers_complete = &Connection::on_headers_complete;
  settings_.on_body = &Connection::on_body;
  settings_.on_message_complete = &Connection::on_message_complete;
  server_.connections.insert(this);
}

Connection::~Connection() { server_.connections.erase(this); }

void Connection::interrupt() noexcept {
  interrupted_ = true;
  if (waiting_ && waiting_interruptible_) waiting_->cancel();
}

void Connection::abort_socket() noexcept {
  interrupted_ = true;
  // Fails every pending and later recv/send on this socket at once.
  (void)::shutdown(fd_.get(), SHUT_RDWR);
  if (waiting_) waiting_->cancel();
}

// --- parser callbacks -------------------------------------------------------------------------

int Connection::on_url(http_parser* p, const char* at, std::size_t len) {
  static_cast<Connection*>(p->data)->request_.target.append(at, len);
  return 0;
}

int Connection::on_header_field(http_parser* p, const char* at, std::size_t len) {
  auto* c = static_cast<Connection*>(p->data);
  if (c->last_was_value_ || c->request_.headers.empty()) {
    c->request_.headers.emplace_back();
    c->last_was_value_ = false;
  }
  std::string& name = c->request_.headers.back().first;
  for (std::size_t i = 0; i < len; ++i)
    name.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(at[i]))));
  return 0;
}

int Connection::on_header_value(http_parser* p, const char* at, std::size_t len) {
  auto* c = static_cast<Connection*>(p->data);
  if (c->request_.headers.empty()) return 0;
  c->request_.headers.back().second.append(at, len);
  c->last_was_value_ = true;
  return 0;
}

int Connection::on_headers_complete(http_parser* p) {
  auto* c = static_cast<Connection*>(p->data);
  Request& r = c->request_;
  r.method = static_cast<http_method>(p->method);
  r.keep_alive = http_should_keep_alive(p) != 0;
  r.has_body = (p->flags & F_CHUNKED) != 0 ||
               ((p->flags & F_CONTENTLENGTH) != 0 && p->content_length > 0);
  std::size_t q = r.target.find('?');
  r.path = r.target.substr(0, q);
  if (q != std::string::npos) r.query = r.target.substr(q + 1);
  if (const std::string* expect = r.header("expect"))
    r.expect_continue = iequals(*expect, "100-continue");
  c->headers_complete_ = true;
  // Stop here so the handler sees the head before any body byte is parsed; the parser resumes
  // on the byte it stopped at.
  http_parser_pause(p, 1);
  return 0;
}

int Connection::on_body(http_parser* p, const char* at, std::size_t len) {
  auto* c = static_cast<Connection*>(p->data);
  // Straight into the reader's buffer while it has room (one copy fewer); the rest waits in
  // body_buf_, bounded by one feed() of the input buffer: read_body() feeds only when that is
  // empty.
  std::size_t direct = std::min(len, c->body_target_.size());
  if (direct > 0) {
    // Bytes received straight into the reader's buffer are already in place.
    if (at != reinterpret_cast<const char*>(c->body_target_.data())) std::memcpy(c->body_target_.data(), at, direct);
    c->body_target_ = c->body_target_.subspan(direct);
  }
  c->body_buf_.append(at + direct, len - direct);
  c->body_end_ = at + len;
  return 0;
}

int Connection::on_message_complete(http_parser* p) {
  static_cast<Connection*>(p->data)->message_complete_ = true;
  // Pipelined bytes of the next request stay in the input buffer until this one is answered.
  http_parser_pause(p, 1);
  return 0;
}

// --- input ------------------------------------------------------------------------------------

void Connection::reset_request() {
  // Between requests an emptied buffer gives its memory back.
  if (in_begin_ == in_end_ && in_.size() > kInputBufferInitialBytes) {
    in_begin_ = in_end_ = 0;
    in_.resize(kInputBufferInitialBytes);
    in_.shrink_to_fit();
  }
  request_ = Request{};
  last_was_value_ = false;
  head_bytes_ = 0;
  headers_complete_ = false;
  message_complete_ = false;
  body_buf_.clear();
  body_off_ = 0;
  body_target_ = {};
  body_end_ = nullptr;
  body_data_left_ = 0;
  continue_sent_ = false;
  response_started_ = false;
  http_parser_pause(&parser_, 0);
}

core::Task<int> Connection::fill(core::CancelSource& cancel,
                                 std::optional<std::chrono::milliseconds> timeout) {
  if (in_begin_ == in_end_) in_begin_ = in_end_ = 0;
  if (in_end_ == in_.size()) {
    if (in_begin_ > 0) {
      // Unparsed bytes move to the front: the parser holds no pointers into the buffer between
      // feeds (the head's fields are copied into the request as they are parsed).
      std::memmove(in_.data(), in_.data() + in_begin_, in_end_ - in_begin_);
      in_end_ -= in_begin_;
      in_begin_ = 0;
    } else if (in_.size() < kInputBufferBytes) {
      in_.resize(std::min(in_.size() * 2, kInputBufferBytes));
    } else {
      co_return -ENOBUFS;
    }
  }
  int n;
  if (timeout) {
    n = co_await core::recv(fd_.get(), in_.data() + in_end_, in_.size() - in_end_)
            .cancel_on(cancel)
            .timeout(*timeout);
  } else {
    n = co_await core::recv(fd_.get(), in_.data() + in_end_, in_.size() - in_end_)
            .cancel_on(cancel);
  }
  if (n > 0) in_end_ += static_cast<std::size_t>(n);
  co_return n;
}

std::size_t Connection::feed(std::size_t max) {
  std::size_t n = std::min(in_end_ - in_begin_, max);
  if (n == 0) return 0;
  bool in_head = !headers_complete_;
  std::size_t used = parse(in_.data() + in_begin_, n);
  in_begin_ += used;
  if (in_head) head_bytes_ += used;
  return used;
}

std::size_t Connection::parse(const char* data, std::size_t size) {
  body_end_ = nullptr;
  std::size_t used = http_parser_execute(&parser_, &settings_, data, size);
  // The parser counts down the bytes left of the body (Content-Length) or of the current chunk
  // in content_length; that count is what comes next only if the input ended on body bytes.
  const bool ended_in_body_data = used == size && body_end_ == data + size && !message_complete_;
  body_data_left_ = ended_in_body_data && parser_.content_length != ULLONG_MAX ? parser_.content_length : 0;
  auto err = HTTP_PARSER_ERRNO(&parser_);
  if (err == HPE_PAUSED) {
    // Paused after the head: the body comes next. Paused after the message: stay paused until
    // the next request starts (reset_request).
    if (!message_complete_) http_parser_pause(&parser_, 0);
  } else if (err == HPE_HEADER_OVERFLOW) {
    close_after_ = true;
    throw HttpError(431, "request header fields too large", true);
  } else if (err != HPE_OK) {
    close_after_ = true;
    throw HttpError(400, fmt::format("malformed HTTP request: {}", http_errno_description(err)),
                    true);
  }
  if (parser_.upgrade) {
    close_after_ = true;
    throw HttpError(400, "protocol upgrades are not supported", true);
  }
  return used;
}

core::Task<Connection::HeadResult> Connection::read_head() {
  reset_request();
  core::CancelSource cancel;
  WaitScope wait(waiting_, waiting_interruptible_, cancel, false);
  std::optional<core::Deadline> deadline;
  const std::size_t max_head = server_.config.max_header_bytes;
  bool started = in_begin_ < in_end_;  // pipelined bytes already here
  if (started) deadline.emplace(cancel, server_.config.slow_client_timeout);
  while (!headers_complete_) {
    if (in_begin_ == in_end_) {
      if (!started && interrupted_) co_return HeadResult::kClosed;
      // Idle between requests: the shutdown may end this wait at once.
      waiting_interruptible_ = !started;
      int n = co_await fill(cancel, started ? std::nullopt
                                            : std::optional(server_.config.idle_timeout));
      waiting_interruptible_ = false;
      if (n == 0) co_return HeadResult::kClosed;  // the client hung up
      if (n < 0) {
        if (started && deadline && deadline->expired()) {
          close_after_ = true;
          co_return HeadResult::kClosed;  // run() answers 408
        }
        co_return HeadResult::kClosed;
      }
      if (!started) {
        started = true;
        deadline.emplace(cancel, server_.config.slow_client_timeout);
      }
    }
    // Feed at most one byte past the limit: enough to know it was exceeded.
    (void)feed(max_head + 1 - std::min(head_bytes_, max_head + 1));
    if (head_bytes_ > max_head) {
      close_after_ = true;
      throw HttpError(431, fmt::format("request head exceeds {} bytes", max_head), true);
    }
  }
  co_return HeadResult::kRequest;
}

core::Task<int> Connection::receive_body_bytes(std::span<std::byte> into) {
  core::CancelSource cancel;
  WaitScope wait(waiting_, waiting_interruptible_, cancel, false);
  co_return co_await core::recv(fd_.get(), into.data(), into.size())
      .cancel_on(cancel)
      .timeout(server_.config.slow_client_timeout);
}

core::Task<std::size_t> Connection::read_body(std::span<std::byte> buf) {
  // Fills `buf` whole unless the body ends first: a tar consumer then handles megabytes per
  // call, not one receive's worth.
  std::size_t got = 0;
  for (;;) {
    if (body_off_ < body_buf_.size()) {
      std::size_t n = std::min(buf.size() - got, body_buf_.size() - body_off_);
      std::memcpy(buf.data() + got, body_buf_.data() + body_off_, n);
      got += n;
      body_off_ += n;
      if (body_off_ == body_buf_.size()) {
        body_buf_.clear();
        body_off_ = 0;
      }
    }
    if (got == buf.size() || message_complete_) co_return got;
    // A streaming reader (ApplyDiff's tar decoder asks for megabytes); the 16 KiB reads of a
    // JSON body keep the connection small and take the plain path.
    const bool streaming = buf.size() - got > kInputBufferBytes;
    const char* received = nullptr;  // body bytes received straight into `buf`
    std::size_t received_size = 0;
    if (in_begin_ == in_end_) {
      int n;
      if (streaming && body_data_left_ > 0) {
        // The next bytes are body data for certain: receive them straight into `buf` and let
        // the parser run over them there (it then reports them in place: no copy).
        auto into = buf.subspan(got, static_cast<std::size_t>(std::min<std::uint64_t>(buf.size() - got, body_data_left_)));
        n = co_await receive_body_bytes(into);
        if (n > 0) {
          received = reinterpret_cast<const char*>(into.data());
          received_size = static_cast<std::size_t>(n);
        }
      } else {
        if (request_.expect_continue && !continue_sent_) {
          // The client waits for this before it sends the body (curl does for large bodies).
          continue_sent_ = true;
          co_await send_all("HTTP/1.1 100 Continue\r\n\r\n");
        }
        if (streaming && in_.size() < kBodyInputBufferBytes) {
          in_begin_ = in_end_ = 0;
          in_.resize(kBodyInputBufferBytes);
        }
        core::CancelSource cancel;
        WaitScope wait(waiting_, waiting_interruptible_, cancel, false);
        n = co_await fill(cancel, server_.config.slow_client_timeout);
      }
      if (n <= 0) close_after_ = true;
      if (n == 0) throw Error(ECONNRESET, "client closed the connection inside the request body");
      if (n == -ECANCELED) throw Error(ETIMEDOUT, "request body stalled");
      if (n < 0) throw Error(n, "receiving the request body");
    }
    // on_body writes straight into the rest of `buf` while the parser runs, and never after
    // (parsing throws on a malformed chunk).
    body_target_ = buf.subspan(got);
    struct ClearTarget {
      std::span<std::byte>& target;
      ~ClearTarget() { target = {}; }
    } clear_target{body_target_};
    if (received) {
      if (parse(received, received_size) != received_size) {
        // Cannot happen: these bytes were all inside the body the parser announced.
        close_after_ = true;
        throw Error(EPROTO, "request body: the parser stopped inside body data");
      }
    } else {
      (void)feed(in_end_ - in_begin_);
    }
    got = buf.size() - body_target_.size();
  }
}

core::Task<std::string> Connection::read_small_body() {
  const std::size_t limit = server_.config.max_json_bytes;
  if ((parser_.flags & F_CONTENTLENGTH) != 0 && parser_.content_length > limit) {
    close_after_ = true;
    throw HttpError(413, fmt::format("request body exceeds {} bytes", limit), true);
  }
  std::string body;
  std::array<std::byte, 16 * 1024> chunk;
  for (;;) {
    std::size_t n = co_await read_body(chunk);
    if (n == 0) break;
    if (body.size() + n > limit) {
      close_after_ = true;
      throw HttpError(413, fmt::format("request body exceeds {} bytes", limit), true);
    }
    body.append(reinterpret_cast<const char*>(chunk.data()), n);
  }
  co_return body;
}

core::Task<bool> Connection::drain_body(std::size_t limit) {
  std::array<std::byte, 16 * 1024> scratch;
  std::size_t total = 0;
  try {
    for (;;) {
      std::size_t n = co_await read_body(scratch);
      if (n == 0) co_return true;
      total += n;
      if (total > limit) co_return false;
    }
  } catch (const std::exception&) {
    // The connection closes: the client's next bytes cannot be trusted as a request start.
  }
  co_return false;
}

// --- output -----------------------------------------------------------------------------------

core::Task<void> Connection::send_all(std::string_view data) {
  std::size_t off = 0;
  while (off < data.size()) {
    int n = co_await core::send(fd_.get(), data.data() + off, data.size() - off)
                .timeout(server_.config.slow_client_timeout);
    if (n == -ECANCELED) throw Error(ETIMEDOUT, "client stopped reading the response");
    if (n < 0) throw Error(n, "sending the response");
    if (n == 0) throw Error(EPIPE, "sending the response");
    off += static_cast<std::size_t>(n);
  }
}

core::Task<void> Connection::send_response(int status, std::string_view content_type,
                                           std::string_view body, bool close,
                                           std::string_view extra_headers) {
  response_started_ = true;
  std::string out = fmt::format("HTTP/1.1 {} {}\r\n", status, reason_phrase(status));
  if (!content_type.empty()) out += fmt::format("Content-Type: {}\r\n", content_type);
  out += fmt::format("Content-Length: {}\r\n", body.size());
  out += extra_headers;
  if (close) out += "Connection: close\r\n";
  out += "\r\n";
  // One send for small answers; large ones (metrics, layers) go as they are.
  if (body.size() <= 64 * 1024) {
    out += body;
    co_await send_all(out);
  } else {
    co_await send_all(out);
    co_await send_all(body);
  }
}

core::Task<void> Connection::begin_chunked(int status, std::string_view content_type) {
  response_started_ = true;
  std::string out = fmt::format(
      "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nTransfer-Encoding: chunked\r\n{}\r\n", status,
      reason_phrase(status), content_type, close_after_ ? "Connection: close\r\n" : "");
  co_await send_all(out);
}

core::Task<void> Connection::send_chunk(std::span<const std::byte> data) {
  // An empty chunk would end the body.
  if (data.empty()) co_return;
  std::string frame = fmt::format("{:x}\r\n", data.size());
  frame.append(reinterpret_cast<const char*>(data.data()), data.size());
  frame += "\r\n";
  co_await send_all(frame);
}

core::Task<void> Connection::finish_chunks() { co_await send_all("0\r\n\r\n"); }

core::Task<bool> Connection::wait_for_events(EventQueue& queue) {
  for (;;) {
    if (queue.overflowed) co_return false;
    if (!queue.lines.empty()) co_return true;
    if (interrupted_) co_return false;
    queue.ready.reset();
    core::CancelSource cancel;
    bool woke;
    {
      WaitScope wait(waiting_, waiting_interruptible_, cancel, true);
      core::Deadline liveness(cancel, server_.config.event_liveness_interval);
      woke = co_await queue.ready.wait(&cancel);
      liveness.disarm();
    }
    if (!woke) {
      if (interrupted_) co_return false;
      // Has the client gone? A non-blocking peek answers without consuming anything.
      char byte;
      ssize_t r = ::recv(fd_.get(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
      if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) co_return false;
    }
  }
}

// --- the request loop -------------------------------------------------------------------------

core::Task<void> Connection::run() {
  ucred cred{};
  socklen_t cred_len = sizeof cred;
  if (::getsockopt(fd_.get(), SOL_SOCKET, SO_PEERCRED, &cred, &cred_len) != 0 ||
      !server_.peer_allowed(cred.uid, cred.gid)) {
    ++server_.stats.refused_peers;
    spdlog::warn("refused a connection from pid {} uid {} gid {}: not an allowed peer", cred.pid,
                 cred.uid, cred.gid);
    try {
      co_await send_response(
          403, "application/json",
          json_error(fmt::format("access denied: uid {} is not allowed on this socket", cred.uid)),
          true);
    } catch (const std::exception&) {
      // The peer is refused either way.
    }
    co_return;
  }

  while (!close_after_) {
    HeadResult head = HeadResult::kClosed;
    int head_error = 0;
    std::string head_message;
    try {
      head = co_await read_head();
    } catch (const HttpError& e) {
      head_error = e.status();
      head_message = e.message();
    } catch (const std::exception& e) {
      head_error = 400;
      head_message = e.what();
    }
    if (head_error == 0 && head == HeadResult::kClosed && close_after_ && !response_started_) {
      // The client started a request and then stalled past the slow-client timeout.
      head_error = 408;
      head_message = "request head not received in time";
    }
    if (head_error != 0) {
      close_after_ = true;
      server_.record("invalid", head_error, 0);
      try {
        co_await send_response(head_error, "application/json", json_error(head_message), true);
      } catch (const std::exception&) {
      }
      break;
    }
    if (head == HeadResult::kClosed) break;

    auto started = std::chrono::steady_clock::now();
    std::string route = "unknown";
    Response response;
    bool failed = false;
    int fail_status = 500;
    std::string fail_message;
    try {
      response = co_await handle_request(*this, route);
    } catch (const HttpError& e) {
      failed = true;
      fail_status = e.status();
      fail_message = e.message();
      if (e.close()) close_after_ = true;
    } catch (const std::exception& e) {
      failed = true;
      fail_message = e.what();
    }
    if (failed) {
      if (response_started_) {
        // A streamed answer broke off: only closing tells the client it is incomplete.
        response.sent = true;
        response.close = true;
        response.status = 200;
      } else {
        response = Response{fail_status, "application/json", json_error(fail_message)};
      }
    }
    if (!response.sent) {
      // Leftover body bytes (an unknown route with a body, an ApplyDiff that stopped at the tar's
      // end marker) are skipped so the connection can carry the next request.
      if (!close_after_ && !message_complete_ &&
          !co_await drain_body(server_.config.max_json_bytes))
        close_after_ = true;
      if (!request_.keep_alive || server_.stopping) close_after_ = true;
      std::string_view extra = response.status == 405 ? "Allow: GET, POST\r\n" : "";
      try {
        co_await send_response(response.status, response.content_type, response.body,
                               close_after_, extra);
      } catch (const std::exception&) {
        close_after_ = true;
      }
    } else if (response.close || !message_complete_ || !request_.keep_alive ||
               server_.stopping) {
      close_after_ = true;
    }
    double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    server_.record(route, response.status, seconds);
  }
}

}  // namespace layerd::api
